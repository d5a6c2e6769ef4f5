"""``checkpoint.prune``: what a crash can leave in the checkpoint directory, and what stays."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

from service_core import ModelState, checkpoint


def test_prune_keeps_only_the_named_version(tmp_path: Path):
    for name in ("0", "1", "2.orbax-checkpoint-tmp-1700000000", ".pruned-0-1a2b3c4d"):
        (tmp_path / name / "arrays").mkdir(parents=True)
        (tmp_path / name / "arrays" / "x.bin").write_bytes(b"rows")
    (tmp_path / "stray").write_text("left by a crash")

    assert checkpoint.prune(tmp_path, keep=1) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]
    assert (tmp_path / "1" / "arrays" / "x.bin").read_bytes() == b"rows"
    assert checkpoint.prune(tmp_path, keep=1) == 0
    assert checkpoint.prune(tmp_path / "absent", keep=0) == 0


def test_a_checkpoint_with_clear_forgotten_ids_is_read_as_keyed_digests(
    tmp_path: Path, unlearner, monkeypatch
):
    """Checkpoints written before ids were digested hold them in clear: restore digests them."""
    state = unlearner.state.replace(forgotten=("gone-1", "gone-2"))

    new_metadata = ModelState.metadata

    def old_metadata(self):
        meta = new_metadata(self)
        del meta["forgotten_form"]
        return meta

    monkeypatch.setattr(ModelState, "metadata", old_metadata)
    checkpoint.save(tmp_path, state)
    monkeypatch.undo()

    key = b"deployment secret"
    back = checkpoint.restore(tmp_path, id_key=key)
    expected = tuple(hmac.new(key, i.encode(), hashlib.sha256).hexdigest() for i in state.forgotten)
    assert back.forgotten == expected and back.id_key == key
    assert "gone-1" not in json.dumps(back.metadata())
