"""scripts/oneshot_masks.py on the tiny SST-2 teacher: what its masks keep, read back from its JSON."""
import importlib.util
import json

from helpers import REPO


def test_oneshot_masks_zero_what_they_say(sst2_teacher_dir, data_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("oneshot_masks", REPO / "scripts" / "oneshot_masks.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "oneshot.json"
    script.main([str(sst2_teacher_dir), "--task", "sst2", "--data-dir", str(data_dir), "--keep", "1.0", "0.5", "0.0",
                 "--out", str(out)])
    written = json.loads(out.read_text())["rows"]
    rows = {(r["criterion"], r["keep"]): r["validation"]["accuracy"] for r in written}
    assert set(rows) == {("dense", 1.0), *((c, k) for c in ("magnitude", "random") for k in (1.0, 0.5, 0.0))}
    # the masks zero what they say (the tiny model's weights have no exact zeros of their own)
    for r in written[1:]:
        assert abs(r["matrix_sparsity"] - (1 - r["keep"])) < 1e-3, r
    # keeping everything is the dense model, whatever chooses the mask
    assert rows[("magnitude", 1.0)] == rows[("random", 1.0)] == rows[("dense", 1.0)]
    # keeping nothing zeroes every encoder matrix: both criteria give the same model
    assert rows[("magnitude", 0.0)] == rows[("random", 0.0)]
