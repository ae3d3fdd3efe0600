"""`python -m lightning_seg.preprocess task=NAME paths.data_dir=DIR` (lightning-seg-preprocess): what training
prepares before its first step, alone: the dataset check, then the preprocessed store every later run reads
(nnU-Net's plan_and_preprocess). Run it once on a cluster's shared filesystem before a sweep."""

import time

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_seg.config import CONFIG_DIR
from lightning_seg.entry import user_errors
from lightning_seg.task import check_task


def preprocess(cfg: DictConfig) -> str:
    """Check the task folder and write its store; return the report line."""
    start = time.monotonic()
    check_task(cfg)
    datamodule = instantiate(cfg.data)
    cases = datamodule.check()
    written = datamodule.store.build(cases, datamodule.prep_workers)
    store, kept = datamodule.store, len(cases) - written
    return (
        f"OK: {len(cases)} cases of {cfg.data.task_dir} preprocessed in {store.path} "
        f"({store.size_bytes(cases) / 2**30:.2f} GiB; {written} written, {kept} as they were; "
        f"{time.monotonic() - start:.1f} s)"
    )


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="preprocess")
def main(cfg: DictConfig) -> None:
    with user_errors(cfg):  # a broken folder or a bad option: every problem found, exit code 2
        report = preprocess(cfg)
    print(report)


if __name__ == "__main__":
    main()
