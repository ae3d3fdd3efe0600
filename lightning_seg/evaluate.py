"""`python -m lightning_seg.evaluate pred=DIR ref=DIR` or `ckpt_path=CKPT task_dir=TASK_DIR split=test`
(`ckpt_path=[A,B,...]`: an ensemble) (console: lightning-seg-evaluate).
Writes per_case.csv, summary.json and summary.md."""

import logging
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from lightning_seg.config import CONFIG_DIR
from lightning_seg.data.layout import declared_labels, read_datalist, read_dataset_json
from lightning_seg.entry import user_errors
from lightning_seg.errors import ConfigError, MissingFileError
from lightning_seg.inference import Predictor
from lightning_seg.predict import list_images, predict_files
from lightning_seg.run_dir import RunDir, write_json
from lightning_seg.scoring import score_files, summarize, summary_markdown

log = logging.getLogger(__name__)


def labels_near(ref_dir: Path) -> list[str]:
    """Label names from the dataset.json of the task folder holding `ref_dir` (labelsTr/)."""
    declared = declared_labels(read_dataset_json(ref_dir.parent))
    if declared is None:
        raise ConfigError(f"{ref_dir.parent / 'dataset.json'}: declares no labels; give labels=[...]")
    return declared[0]


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    with user_errors(cfg):  # a missing file or a bad option: one `error:` line, exit code 2
        return evaluate(cfg)


def evaluate(cfg: DictConfig) -> float | None:
    output = Path(cfg.output or (Path(cfg.pred) / "evaluation" if cfg.pred else "evaluation"))
    output.mkdir(parents=True, exist_ok=True)
    if cfg.ckpt_path:
        if not cfg.task_dir:
            raise ConfigError("ckpt_path needs task_dir=TASK_DIR (the task folder to predict and score)")
        # several checkpoints: an ensemble; the split comes from the first one's run (the folds of a
        # cross-validation share their test cases)
        checkpoints = list(cfg.ckpt_path) if OmegaConf.is_list(cfg.ckpt_path) else [cfg.ckpt_path]
        predictor = Predictor(checkpoints, **cfg.predict)
        labels = list(cfg.labels or predictor.labels)
        regions = cfg.regions or predictor.task.get("regions")
        cases = RunDir.of_checkpoint(checkpoints[0]).cases_of_split(
            read_datalist(cfg.task_dir), cfg.split, cfg.task_dir
        )
        start = time.perf_counter()
        predictions = predict_files(predictor, [c["image"] for c in cases], output / "predictions")
        seconds = time.perf_counter() - start
        log.info(
            "predicted %d cases in %.1f s (%.2f cases/s, mirror=%s)",
            len(cases),
            seconds,
            len(cases) / seconds,
            cfg.predict.mirror,
        )
        pairs = list(zip(predictions, [Path(c["label"]) for c in cases], strict=True))
        names = " + ".join(Path(c).name for c in checkpoints)
        title = f"{predictor.task['name']}: {names} on {len(cases)} '{cfg.split}' cases"
    else:
        if not (cfg.pred and cfg.ref):
            raise ConfigError("give pred=DIR ref=DIR, or ckpt_path=CKPT task_dir=TASK_DIR")
        ref_dir = Path(cfg.ref)
        pairs = [(p, ref_dir / p.name) for p in list_images(cfg.pred)]
        missing = [str(r) for _, r in pairs if not r.is_file()]
        if missing:
            raise MissingFileError(f"no reference for {len(missing)} prediction(s): {', '.join(missing[:5])}")
        labels = list(cfg.labels or labels_near(ref_dir))
        regions = cfg.regions
        title = f"{cfg.pred} against {cfg.ref}"
    regions = OmegaConf.to_container(regions) if OmegaConf.is_config(regions) else regions
    per_case = score_files(pairs, labels, regions)
    summary = summarize(per_case, labels, regions)
    per_case.to_csv(output / "per_case.csv", index=False)
    write_json(output / "summary.json", summary)
    (output / "summary.md").write_text(summary_markdown(summary, title))
    log.info(
        "foreground mean Dice %s over %d cases -> %s", summary["foreground_mean_dice"], len(per_case), output
    )
    return summary["foreground_mean_dice"]


if __name__ == "__main__":
    main()
