"""For measure.py: patches per second that one core draws (read, cut, augment) with the training cases held
in memory and read from the store on disk, A-B-B-A, per recipe. Arguments: train.yaml overrides."""

import json
import sys

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_seg.config import CONFIG_DIR
from lightning_seg.study.bench.worker_rate import patches_per_worker_s


def datamodule(argv):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=argv)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


for recipe in ("reference_talk", "nnunet"):
    sets = {
        cache: datamodule([*sys.argv[1:], f"recipe={recipe}", f"data.cache={cache}"])
        for cache in ("memory", "disk")
    }
    rates = {cache: [] for cache in sets}
    for cache in ("disk", "memory", "memory", "disk"):
        rates[cache].append(patches_per_worker_s(sets[cache].train_set, min_s=20.0)["patches_per_s"])
    mean = {cache: sum(r) / len(r) for cache, r in rates.items()}
    print(
        json.dumps(
            {
                "what": f"patches/s, one core, {recipe}, 128^3, 2 per drawn case",
                "memory": mean["memory"],
                "disk": mean["disk"],
                "disk_over_memory": mean["disk"] / mean["memory"],
                "rounds": rates,
            }
        ),
        flush=True,
    )
    del sets
