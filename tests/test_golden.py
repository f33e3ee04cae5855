"""The golden test: a short SMAT run and a short PMF run end exactly where they were pinned.

Each run meta-trains 8 episodes on two small image-folder domains and a small random ViT (a few
seconds), then tests. The fingerprint is a SHA-256 per final tensor (checkpoint.pt's model and
optimiser state, best.pt's model), of the metrics lines without their timings, and of results.json
without its timings, provenance, paths and configuration. A refactor that passes this test changed
no number of the default run or of PMF.

An intended change of the numbers is re-pinned with one command, from the repository root:

    python tests/test_golden.py --repin

which rewrites tests/golden.json; commit it with the change and say why in the commit message.
Floating-point results depend on the torch version and the CPU's vector instructions, so the pinned
file records both: on another torch or CPU the test is skipped with a note to re-pin there first,
on the unchanged code, before a refactor.
"""

import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (--repin) from the repository root
    sys.path.insert(0, str(ROOT))

import train  # noqa: E402
from assets import make_assets  # noqa: E402
from smat import Config  # noqa: E402

GOLDEN = Path(__file__).with_name("golden.json")
TIMING = {"episodes_per_second", "peak_memory_gib", "seconds"}  # measured, never pinned
NOT_NUMBERS = {"provenance", "config", "data", "variant"}  # results.json entries that are no result (paths, labels)


def golden_config(assets: Path, method: str) -> Config:
    """8 episodes in meta-batches of 2, validated twice, tested on 3 episodes per domain."""
    values = dict(data=f"folder:{assets / 'alpha'}@id,folder:{assets / 'beta'}@ood", backbone=str(assets / "vit.pt"),
                  image_size=16, episodes=8, meta_batch=2, train_ways=3, train_shots=2, train_queries=2,
                  test_ways=3, test_shots=2, test_queries=2, val_every=4, val_episodes=2, test_episodes=3,
                  checkpoint_every=2)
    return Config.pmf(**values) if method == "pmf" else Config(n_experts=2, **values)


def tensor_hashes(prefix: str, tree: object) -> dict[str, str]:
    """name -> SHA-256 of the tensor's dtype, shape and bytes, for every tensor in a nested dict/list."""
    if isinstance(tree, torch.Tensor):
        t = tree.detach().cpu().contiguous()
        raw = t.view(torch.uint8) if t.dim() and t.numel() else t.reshape(-1).view(torch.uint8)
        head = f"{t.dtype} {tuple(t.shape)}".encode()
        return {prefix: hashlib.sha256(head + raw.numpy().tobytes()).hexdigest()}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else []
    return {k: v for key, value in items for k, v in tensor_hashes(f"{prefix}.{key}", value).items()}


def without(tree: object, keys: set[str]) -> object:
    """`tree` with every dict entry named in `keys` dropped, at any depth."""
    if isinstance(tree, dict):
        return {k: without(v, keys) for k, v in tree.items() if k not in keys}
    if isinstance(tree, list):
        return [without(v, keys) for v in tree]
    return tree


def digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def fingerprint(run: Path) -> dict[str, str]:
    """What a run computed, as hashes: every final tensor, the metrics lines, the test results."""
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)
    prints = tensor_hashes("checkpoint.model", checkpoint["model"])
    prints |= tensor_hashes("checkpoint.optimizer", checkpoint["optimizer"])
    prints |= tensor_hashes("best.model", best["model"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    prints["metrics.jsonl"] = digest([without(r, TIMING) for r in records if "start" not in r])
    prints["results.json"] = digest(without(json.loads((run / "results.json").read_text()), TIMING | NOT_NUMBERS))
    prints["where"] = digest({k: checkpoint[k] for k in ("step", "episode", "best_val", "best_episode")})
    return prints


def machine() -> dict[str, str]:
    """What floating-point results depend on besides the code."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def run_fingerprint(method: str, base: Path) -> dict[str, str]:
    assets = base / "assets"
    if not assets.exists():
        make_assets(assets)
    run = train.meta_train(golden_config(assets, method), base / method, device="cpu", cache_dir=base / "cache",
                           console=Console(file=io.StringIO()), workers=0)
    return fingerprint(run)


@pytest.fixture(scope="module")
def pinned() -> dict:
    golden = json.loads(GOLDEN.read_text())
    if golden["machine"] != machine():
        pytest.skip(f"tests/golden.json was pinned on {golden['machine']}, this is {machine()}: floating-point "
                    f"results differ between them; re-pin here on the unchanged code: python tests/test_golden.py --repin")
    return golden


@pytest.mark.parametrize("method", ["smat", "pmf"])
def test_a_short_run_ends_on_the_pinned_tensors_metrics_and_results(pinned, method, tmp_path):
    prints = run_fingerprint(method, tmp_path)

    changed = sorted(k for k in prints.keys() | pinned[method].keys() if prints.get(k) != pinned[method].get(k))
    assert changed == [], (f"{method}: {len(changed)} of {len(prints)} fingerprints differ from tests/golden.json, "
                           f"first {changed[:5]}; if the change is intended: python tests/test_golden.py --repin")


def test_the_fingerprint_sees_a_change_in_one_tensor_element(tmp_path):
    state = {"delta": torch.zeros(5), "nested": [torch.ones(2, dtype=torch.long)]}
    before = tensor_hashes("m", state)
    state["delta"][3] = 1e-30

    after = tensor_hashes("m", state)

    assert before.keys() == after.keys() == {"m.delta", "m.nested.0"}
    assert before["m.delta"] != after["m.delta"] and before["m.nested.0"] == after["m.nested.0"]


def repin() -> None:
    torch.set_num_threads(1)  # as the tests run (tests/conftest.py)
    with tempfile.TemporaryDirectory() as base:
        golden = {"machine": machine(), **{m: run_fingerprint(m, Path(base)) for m in ("smat", "pmf")}}
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN.relative_to(ROOT)}: {sum(len(v) for v in golden.values())} fingerprints")


if __name__ == "__main__":
    if sys.argv[1:] != ["--repin"]:
        sys.exit("usage: python tests/test_golden.py --repin   (rewrites tests/golden.json)")
    repin()
