"""The finetune stage's entry point, importable without torch (the `[train]` extra).

With `finetune.base_model_path` empty the stage is skipped with one line on stderr and a
report.json saying so, so that `dvc repro` on a fresh machine (core install, no torch) completes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pipeline.core.errors import printable
from pipeline.core.params import Params
from pipeline.core.stage import Stage


def skip_report(reason: str) -> dict:
    return {"skipped": True, "reason": reason}


def run_finetune(params: Params, parquet_dir: Path, out_dir: Path,
                 stop_after: int | None = None, scheduler: str | None = None) -> dict:
    """Fine-tune (finetune.train; on the run's dask cluster when there is one), or skip
    cleanly when no base model path is set."""
    if not params.finetune.base_model_path.strip():
        reason = "finetune.base_model_path is empty (set it in params.yaml to train)"
        print(printable(f"finetune skipped: {reason}"), file=sys.stderr)
        with Stage("finetune", params, scheduler).output(Path(out_dir),
                                                         inputs=[parquet_dir]) as out:
            out.report = skip_report(reason)
        return out.report
    from finetune.train import train_from_params

    return train_from_params(params, parquet_dir, out_dir, stop_after, scheduler=scheduler)
