"""Your own model and data, from files outside the package, in every loop (`hpo`, `online`,
`fewshot`), by `_target_` on the command line or by YAML files in a search path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from _train_utils import metrics, run_train

USER_CODE = textwrap.dedent(
    '''
    """A user's own network and data, outside metagrad."""
    import torch
    from torch import nn

    from metagrad.tasks import TaskBatch, TensorTask


    class TwoLayer(nn.Module):
        def __init__(self, in_features, out_features, width=16):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(in_features, width), nn.Tanh())
            self.head = nn.Linear(width, out_features)

        def forward(self, x):
            return self.head(self.body(x))


    def blobs(n, seed, classes=3, dim=5):
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
        y = torch.randint(0, classes, (n,), generator=g)
        return centers[y] + torch.randn(n, dim, generator=g), y


    class Blobs(TensorTask):
        """Gaussian blobs: a supervised task."""

        def __init__(self, batch_size=32):
            super().__init__(blobs(300, 0), blobs(100, 1), blobs(100, 2), batch_size=batch_size,
                             model_args={"in_features": 5, "out_features": 3})


    class BlobEpisodes:
        """Few-shot tasks: each picks 2 of 6 blob centers (classes 0-3 train, 4-5 test)."""

        loss = "cross_entropy"

        def episodes(self, split, count, seed):
            g = torch.Generator().manual_seed(seed * 3 + ["train", "val", "test"].index(split))
            centers = torch.randn(6, 5, generator=torch.Generator().manual_seed(7)) * 3
            pool = [0, 1, 2, 3] if split == "train" else [4, 5]
            sets = []
            for _ in range(count):
                pick = torch.tensor(pool)[torch.randperm(len(pool), generator=g)[:2]]
                y = torch.randint(0, 2, (2, 8), generator=g)
                x = centers[pick][y] + torch.randn(2, 8, 5, generator=g)
                sets.append((x[0], y[0], x[1], y[1]))
            return TaskBatch(*(torch.stack(s) for s in zip(*sets)))

        def model_args(self):
            return {"in_features": 5, "out_features": 2}
    '''
)

SHORT = ["outer_steps=2", "val_every=1", "checkpoint_every=1", "logger=none"]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project folder: their package, and runs started from there."""
    (tmp_path / "mylab").mkdir()
    (tmp_path / "mylab" / "__init__.py").write_text("")
    (tmp_path / "mylab" / "code.py").write_text(USER_CODE)
    return tmp_path


@pytest.mark.parametrize(
    "overrides",
    [
        ["model._target_=mylab.code.TwoLayer", "task._target_=mylab.code.Blobs", "horizon=5"],
        [
            "experiment=hd_digits",
            "model._target_=mylab.code.TwoLayer",
            "task._target_=mylab.code.Blobs",
        ],
        [
            "loop=fewshot",
            "learner=maml",
            "learner.inner_lr=0.1",
            "model._target_=mylab.code.TwoLayer",
            "+model.width=8",
            "task._target_=mylab.code.BlobEpisodes",
            "meta_batch=3",
            "eval_tasks=12",
        ],
    ],
    ids=["hpo", "online", "fewshot"],
)
def test_own_model_and_task_by_target(project: Path, overrides: list[str]) -> None:
    proc = run_train(project / "run", *overrides, *SHORT, cwd=project)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = metrics(project / "run")["final"]
    assert any(k.startswith("test/accuracy") for k in final), final
    recorded = (project / "run" / ".hydra" / "config.yaml").read_text()
    assert "mylab.code.TwoLayer" in recorded and "hidden" not in recorded


def test_own_yaml_options_in_a_search_path(project: Path) -> None:
    (project / "conf" / "model").mkdir(parents=True)
    (project / "conf" / "task").mkdir(parents=True)
    (project / "conf" / "model" / "twolayer.yaml").write_text(
        "_target_: mylab.code.TwoLayer\nin_features: ???\nout_features: ???\nwidth: 12\n"
    )
    (project / "conf" / "task" / "blobs.yaml").write_text(
        "_target_: mylab.code.Blobs\nbatch_size: 16\n"
    )
    proc = run_train(
        project / "run",
        "hydra.searchpath=[file://conf]",
        "model=twolayer",
        "task=blobs",
        "horizon=5",
        *SHORT,
        cwd=project,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "width: 12" in (project / "run" / ".hydra" / "config.yaml").read_text()
