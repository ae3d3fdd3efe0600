"""`python -m lightning_seg.evaluate pred=DIR ref=DIR` or `ckpt_path=CKPT task_dir=TASK_DIR split=test`
(`ckpt_path=[A,B,...]`: an ensemble; lightning-seg-evaluate) writes per_case.csv, summary.json, summary.md."""

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
from lightning_seg.trust import named_by

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    with user_errors(cfg):  # a missing file or a bad option: one `error:` line, exit code 2
        output = Path(cfg.output or (Path(cfg.pred) / "evaluation" if cfg.pred else "evaluation"))
        output.mkdir(parents=True, exist_ok=True)
        if cfg.ckpt_path:
            if not cfg.task_dir:
                raise ConfigError("ckpt_path needs task_dir=TASK_DIR (the task folder to predict and score)")
            checkpoints = list(cfg.ckpt_path) if OmegaConf.is_list(cfg.ckpt_path) else [cfg.ckpt_path]
            predictor = Predictor(checkpoints, trusted_targets=named_by(cfg), **cfg.predict)
            labels = list(cfg.labels or predictor.labels)
            regions = cfg.regions or predictor.task.get("regions")
            run = RunDir.of_checkpoint(checkpoints[0])  # an ensemble: its first run's split (folds share it)
            listed = read_datalist(cfg.task_dir, cfg.allow_outside_paths)
            cases = run.cases_of_split(listed, cfg.split, cfg.task_dir)
            start = time.perf_counter()
            predictions = predict_files(predictor, [c["image"] for c in cases], output / "predictions")
            seconds = time.perf_counter() - start
            speed = (len(cases), seconds, len(cases) / seconds)
            log.info("predicted %d cases in %.1f s (%.2f cases/s, mirror=%s)", *speed, cfg.predict.mirror)
            pairs = list(zip(predictions, [Path(c["label"]) for c in cases], strict=True))
            names = " + ".join(Path(c).name for c in checkpoints)
            title = f"{predictor.task['name']}: {names} on {len(cases)} '{cfg.split}' cases"
        else:
            if not (cfg.pred and cfg.ref):
                raise ConfigError("give pred=DIR ref=DIR, or ckpt_path=CKPT task_dir=TASK_DIR")
            ref_dir = Path(cfg.ref)
            pairs = [(p, ref_dir / p.name) for p in list_images(cfg.pred)]
            if missing := [str(r) for _, r in pairs if not r.is_file()]:
                raise MissingFileError(
                    f"no reference for {len(missing)} prediction(s): {', '.join(missing[:5])}"
                )
            # unless given: the labels declared by dataset.json of the task folder holding ref/ (labelsTr/)
            if not cfg.labels and (declared := declared_labels(read_dataset_json(ref_dir.parent))) is None:
                raise ConfigError(f"{ref_dir.parent / 'dataset.json'}: declares no labels; give labels=[...]")
            labels = list(cfg.labels or declared[0])
            regions = cfg.regions
            title = f"{cfg.pred} against {cfg.ref}"
        per_case = score_files(pairs, labels, regions)
        summary = summarize(per_case, labels, regions)
        per_case.to_csv(output / "per_case.csv", index=False)
        write_json(output / "summary.json", summary)
        (output / "summary.md").write_text(summary_markdown(summary, title))
        dice = summary["foreground_mean_dice"]
        log.info("foreground mean Dice %s over %d cases -> %s", dice, len(per_case), output)
        return dice


if __name__ == "__main__":
    main()
