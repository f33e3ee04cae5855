"""Update size or sparse routing? Each trained δ scaled by s, tested on the run's own test episodes.

    python benchmarks/delta_scaling.py RUN [--scales 0.25 0.5 1 1.5] [--episodes 200] [--norm-of OTHER_RUN]

A task model is θ_i = θ_pre + u_i with u_i = (Σ_m w_m z_m) ⊙ δ for SMAT and u_i = δ for PMF. Scaling
δ by s scales every task's update by s and changes nothing else (router, masks, prototype head), so
accuracy against s separates *how far* the model moves from *where* it moves. `--norm-of OTHER_RUN`
adds the scale that gives RUN's update the norm of OTHER_RUN's (`update_norm`): PMF tested at SMAT's
update size. Writes RUN/delta-scaling-<N>ep.json: per scale, evaluate.py's results (per-episode
accuracies on the first N test episodes per domain of the run's data, episode seed 0, so every scale
and every run shares the episodes of train.py's own test) and the scaled update norm.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli  # noqa: E402  (the repository root is on the path only now)
import evaluate  # noqa: E402
import readers  # noqa: E402
import rundir  # noqa: E402
import smat  # noqa: E402

SCALES = (0.25, 0.5, 1.0, 1.5)


def update_norm(state: dict, router_weights: list[list[float]]) -> float:
    """‖θ_i − θ_pre‖ of the tested model: for SMAT with the router weights averaged over each test
    domain's episodes (one list per domain), mean over domains; for PMF ‖δ‖, every task's update."""
    if "log_alpha" not in state:
        return state["delta"].norm().item()
    gates = smat.eval_gates(state["log_alpha"])
    return statistics.fmean(((torch.tensor(w) @ gates) * state["delta"]).norm().item() for w in router_weights)


def tested_update_norm(run: Path) -> float:
    """update_norm of a run's best.pt, with the router weights of its own final test (results.json)."""
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=True)["model"]
    results = json.loads((run / "results.json").read_text())
    return update_norm(state, [d["router_weights"] for d in results["domains"].values()])


def scaled(run: Path, scales: list[float], episodes: int) -> dict:
    """{"scales": {s: results}, "norms": {s: update norm}} of the run's model with δ scaled by each s."""
    model, cfg, _ = rundir.load_run(run)
    sources = readers.parse_data_spec(cfg.data, cfg.image_size, seed=0)
    trained = model.delta.detach().clone()
    out: dict = {"run": run.name, "episodes": episodes, "scales": {}, "norms": {}}
    for s in scales:
        with torch.no_grad():
            model.delta.copy_(trained * s)
        results = evaluate.evaluate_model(model, sources, cfg, episodes=episodes, seed=0)
        results.pop("experts", None)  # the masks do not change with s; the run's results.json has them
        out["scales"][f"{s:g}"] = results
        out["norms"][f"{s:g}"] = update_norm(model.state_dict(), [d["router_weights"] for d in results["domains"].values()])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    parser.add_argument("--episodes", type=int, default=200, help="test episodes per domain (a prefix of the run's)")
    parser.add_argument("--norm-of", type=Path, default=None, metavar="OTHER_RUN",
                        help="also test at the scale that gives this run OTHER_RUN's update norm")
    args = parser.parse_args(argv)
    try:
        if args.episodes < 2 or any(not 0 <= s <= 100 for s in args.scales):
            raise rundir.RunError(f"--episodes {args.episodes} / --scales {args.scales}: use >= 2 episodes "
                                  f"and scales in [0, 100]")
        scales = list(args.scales)
        if args.norm_of is not None:
            scales.append(tested_update_norm(args.norm_of) / tested_update_norm(args.run))
        out = scaled(args.run, scales, args.episodes)
    except (rundir.RunError, evaluate.EvaluateError, readers.DataError, OSError) as error:
        print(f"error: {cli.one_line(str(error))}", file=sys.stderr)
        return 2
    if args.norm_of is not None:
        out["matched"] = {"to": args.norm_of.name, "scale": f"{scales[-1]:g}"}
    path = args.run / f"delta-scaling-{args.episodes}ep.json"
    rundir.atomic_write_text(json.dumps(out) + "\n", path)
    for s, results in out["scales"].items():
        print(f"{args.run.name} δ × {s}: norm {out['norms'][s]:.2f}, ID {results['id_avg']:.2f}, OOD {results['ood_avg']:.2f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
