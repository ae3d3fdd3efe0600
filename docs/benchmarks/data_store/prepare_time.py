"""For measure.py: a checkout's data preparation before the first step, timed: `prepare_data` (dataset
check; this commit also writes the store) and `setup("fit")` (the previous commit filled its in-memory
CacheDataset of the training and validation cases there). Arguments: the checkout, train.yaml overrides."""

import sys
import time

sys.path.insert(0, sys.argv[1])

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402

import lightning_seg  # noqa: E402
from lightning_seg.config import CONFIG_DIR  # noqa: E402

assert lightning_seg.__file__.startswith(sys.argv[1]), lightning_seg.__file__  # the checkout asked for
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    cfg = compose(config_name="train", overrides=sys.argv[2:])
start = time.perf_counter()
dm = instantiate(cfg.data)
dm.prepare_data()
dm.setup("fit")
print(time.perf_counter() - start)
