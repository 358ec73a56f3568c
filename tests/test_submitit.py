"""The cluster path, exercised: a sweep through hydra-submitit-launcher's local executor.

``hydra/launcher=submitit_local`` goes through the same submission, pickling of the task function and
result collection as ``hydra/launcher=slurm`` (our SLURM preset), with local processes instead of SLURM
jobs. Each job is a fresh process that never ran ``main()``, so it must load the plug-in from the
config's ``plugins`` itself. Skipped when the ``slurm`` extra (hydra-submitit-launcher) is not installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_plugins import readme_plugin
from test_train import FAKE

from harness.bench.peers import installed

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,  # two sweeps of two job processes each (python + torch start-up): ~1 min on 2 cores
    pytest.mark.skipif(not installed("hydra_plugins.hydra_submitit_launcher"),
                       reason="needs the slurm extra: pip install hydra-submitit-launcher"),
]


def sweep(workdir: Path, sweep_dir: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "harness.train", "-m", "hydra/launcher=submitit_local",
           "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={workdir / sweep_dir}",
           *FAKE, "attention=full,my_attention", "plugins=[my_attention]", "num_threads=1",
           f"results_dir={workdir / 'results'}", f"cache_dir={workdir / 'cache'}"]
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")])  # the fake task lives in tests/
    return subprocess.run(cmd, cwd=workdir, env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True,
                          timeout=600)


def records(workdir: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((workdir / "results" / "train").glob("*.json"))}


def test_submitit_local_sweep_lands_every_record_once_and_a_resubmission_skips_them(tmp_path):
    (tmp_path / "my_attention.py").write_text(readme_plugin())
    first = sweep(tmp_path, "sweep1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    done = records(tmp_path)
    assert sorted(r["attention"] for r in done.values()) == ["full", "my_attention"]  # one record per run
    assert all(r["status"] == "ok" and r["plugins"] == ["my_attention"] for r in done.values())
    # Each run ran in its own submitit job folder, not in the submitting process.
    assert all(Path(r["output_dir"]).parent == tmp_path / "sweep1" for r in done.values())

    again = sweep(tmp_path, "sweep2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert records(tmp_path) == done  # nothing rewritten, nothing added
    logs = [p.read_text() for p in (tmp_path / "sweep2").rglob("train.log")]
    assert len(logs) == 2 and all("skipping" in log and "already has an ok record" in log for log in logs)
