"""Speed and memory of SMAT's training step and zero-shot inference (docs/performance.md).

A benchmark, not a test. For each backbone preset, episode shape and expert count it measures the
median milliseconds per episode (after warm-up; CUDA synchronised) and the memory of:

  smat      one SMAT training episode: meta_train_step, backward, and 1/meta_batch of the optimiser
            step (one meta-batch is timed and divided by meta_batch, as train.py runs it)
  pmf       the dense ProtoNet (P>M>F) step, the same code with SMAT's parts off (Config.pmf)
  fwdbwd    a bare forward+backward of the backbone nn.Module over the same images (the floor)
  predict   zero-shot inference, smat.predict, next to a plain ProtoNet on the frozen backbone
            (predict(..., pretrained=True)) and their ratio

Memory: on CUDA `peak_mib` is torch.cuda.max_memory_allocated over one meta-batch, counting this
variant's own model, optimiser state and episode tensors (so an A/B run reports what each would
need alone). On both devices `saved_mib` is what autograd keeps for backward in one episode
(unique storages packed by saved-tensor hooks, the model's own parameters and buffers excluded);
on CPU it is the only memory figure (no peak allocator statistics there).

Run from the repository root:
  python benchmarks/bench.py                                   # tiny preset, every part, CPU or CUDA
  python benchmarks/bench.py --preset vit_small_patch16 --experts 8,16 --parts smat,pmf,fwdbwd
  python benchmarks/bench.py --baseline /tmp/smat_before.py    # A/B against another smat.py,
                                                               # repeats interleaved in one process
  python benchmarks/bench.py --preset vit_small_patch16 --parts smat --memory-only   # CPU: memory only
On a shared CPU pass --threads 1: with two threads and other jobs running, torch's threads spin against
each other and single repeats vary several-fold.
Results print as a table and go to --json (default benchmarks/results/bench-<device>.json).
"""

import argparse
import datetime
import gc
import importlib.util
import inspect
import json
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"10w2s": (10, 2, 10), "20w18s": (20, 18, 10)}  # name -> (ways, shots, queries per class)
IMAGE_SIZE = {"tiny": 32, "vit_small_patch16": 128, "vit_base_patch16": 128}
PARTS = ("smat", "pmf", "fwdbwd", "predict")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--preset", default=None, help="comma list of backbone presets (default: tiny on CPU, "
                   "tiny,vit_small_patch16 on CUDA)")
    p.add_argument("--image-size", type=int, default=None, help="override the preset's image size")
    p.add_argument("--shapes", default="10w2s,20w18s", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--experts", default="1,4,8,16", help="comma list of expert counts for smat/predict")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="meta-batches (predict: episodes x meta-batch) untimed")
    p.add_argument("--repeats", type=int, default=5, help="timed meta-batches; median over them")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="CUDA autocast; auto as train.py (bf16 where the card has it natively, else fp16)")
    p.add_argument("--baseline", type=Path, default=None, help="another smat.py to measure interleaved (A/B)")
    p.add_argument("--compile", action="store_true", help="also measure smat/pmf with train.py's --compile "
                   "(rows 'smat:compiled', 'pmf:compiled'), interleaved with eager; warm-up >= 2 recommended")
    p.add_argument("--memory-only", action="store_true", help="measure memory only (no warm-up, no timing)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-typecheck", action="store_true", help="JAXTYPING_DISABLE=1 (train.py keeps checks on)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    unknown = [x for x in args.parts.split(",") if x not in PARTS]
    unknown += [x for x in args.shapes.split(",") if x not in SHAPES]
    if unknown:  # one line and exit code 2, as every CLI of the project
        p.exit(2, f"bench.py: unknown part or shape {unknown[0]!r}; parts: {', '.join(PARTS)}; "
                  f"shapes: {', '.join(SHAPES)}\n")
    return args


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


# --- measuring --------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes autograd saves for backward while fn() runs forward: unique storages, minus `exclude`."""
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in exclude:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def peak_bytes(fn, resident: int, device: torch.device) -> int | None:
    """CUDA peak over fn() as if only `resident` bytes had been allocated before it; None on CPU."""
    if device.type != "cuda":
        return None
    sync(device)
    gc.collect()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before + resident


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


# --- workloads ----------------------------------------------------------------------------------


class Episode:
    def __init__(self, ways: int, shots: int, queries: int, size: int, device: torch.device) -> None:
        g = torch.Generator().manual_seed(0)
        self.n_way = ways
        self.support_labels = torch.arange(ways).repeat(shots).to(device)
        self.query_labels = torch.arange(ways).repeat(queries).to(device)
        self.support_images = torch.randn(ways * shots, 3, size, size, generator=g).to(device)
        self.query_images = torch.randn(ways * queries, 3, size, size, generator=g).to(device)

    def tensors(self):
        return [self.support_images, self.support_labels, self.query_images, self.query_labels]


def build(smat_module, preset: str, cfg, device: torch.device):
    """A SMAT model on a randomly initialised preset backbone (random weights time like trained ones)."""
    import backbone as backbones

    torch.manual_seed(0)
    vit = backbones.build_backbone(preset)
    torch.manual_seed(0)
    return smat_module.SMAT(vit, cfg).to(device)


class StepWorkload:
    """One meta-batch of SMAT (or PMF) training episodes with a given smat module."""

    def __init__(self, smat_module, model, episode: Episode, autocast, device: torch.device) -> None:
        import smat

        self.smat, self.model, self.episode = smat_module, model, episode
        self.autocast, self.device = autocast, device
        self.optimizer = smat_module.MetaOptimizer(model)
        # smat.py's meta_update, as train.py calls it; an older smat.py given by --baseline may lack
        # it, and then takes this one (it only calls the model's and the optimiser's own methods)
        self.meta_update = getattr(smat_module, "meta_update", smat.meta_update)
        self.counter = 0

    def episode_forward(self):
        e, self.counter = self.episode, self.counter + 1
        generator = torch.Generator(device=self.device).manual_seed(self.counter)
        with self.autocast():
            return self.smat.meta_train_step(self.model, e.support_images, e.support_labels, e.query_images,
                                             e.query_labels, e.n_way, generator)

    def meta_batch(self) -> None:
        batch = self.model.cfg.meta_batch
        outputs = []
        for _ in range(batch):
            out = self.episode_forward()
            (out.loss / batch).backward()
            outputs.append(out)
        self.meta_update(self.model, self.optimizer, outputs, 1.0)

    def resident(self) -> int:
        states = [v for s in self.optimizer.state_dict().values() for st in s["state"].values()
                  for v in st.values() if isinstance(v, torch.Tensor)]
        return tensor_bytes([*self.model.parameters(), *self.model.buffers(), *states, *self.episode.tensors()])

    def model_storages(self) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in [*self.model.parameters(), *self.model.buffers()]}

    def per_repeat(self) -> int:
        return self.model.cfg.meta_batch


class PredictWorkload(StepWorkload):
    """`meta_batch` zero-shot predictions (so one repeat covers as many episodes as a training one)."""

    def __init__(self, smat_module, model, episode, autocast, device, pretrained: bool) -> None:
        super().__init__(smat_module, model, episode, autocast, device)
        self.pretrained = pretrained
        # as evaluate.py does: the test gates depend only on log α, so they are computed once per
        # evaluation, not per episode (older smat.py versions given by --baseline lack the argument)
        self.cached = {}
        if not pretrained and model.cfg.method == "smat" and "gates" in inspect.signature(smat_module.predict).parameters:
            with torch.no_grad():
                gates_of = getattr(smat_module, "eval_gates", None) or smat_module.test_gates  # older name
                self.cached = {"gates": gates_of(model.log_alpha)}

    def meta_batch(self) -> None:
        e = self.episode
        for _ in range(self.model.cfg.meta_batch):
            with self.autocast():
                self.smat.predict(self.model, e.support_images, e.support_labels, e.query_images, e.n_way,
                                  pretrained=self.pretrained, **self.cached)


class FwdBwdWorkload:
    """Forward+backward of the plain backbone module over support ∪ query, `meta_batch` times."""

    def __init__(self, preset: str, episode: Episode, meta_batch: int, autocast, device: torch.device) -> None:
        import backbone as backbones

        torch.manual_seed(0)
        self.net = backbones.build_backbone(preset).to(device)
        self.images = torch.cat([episode.support_images, episode.query_images])
        self.batch, self.autocast, self.episode = meta_batch, autocast, episode

    def episode_forward(self):
        with self.autocast():
            return self.net(self.images).float().pow(2).mean()

    def meta_batch(self) -> None:
        for _ in range(self.batch):
            self.episode_forward().backward()
        self.net.zero_grad(set_to_none=True)

    def resident(self) -> int:
        return tensor_bytes([*self.net.parameters(), *self.episode.tensors()])

    def model_storages(self) -> set[int]:
        return {p.untyped_storage().data_ptr() for p in self.net.parameters()}

    def per_repeat(self) -> int:
        return self.batch


def measure(workloads: dict, args, device: torch.device) -> dict[str, dict]:
    """Warm up, then time every workload `repeats` times, interleaved (A, B, A, B, ...).

    With --memory-only: no warm-up and no timing (ms fields None), for slow devices and big presets.
    """
    for w in workloads.values():
        for _ in range(0 if args.memory_only else args.warmup):
            w.meta_batch()
    results = {}
    for name, w in workloads.items():
        forward_only = isinstance(w, PredictWorkload)
        saved = None if forward_only else saved_bytes(w.episode_forward, w.model_storages())  # graph dropped
        results[name] = {"saved_mib": None if saved is None else saved / 2**20,
                         "peak_mib": _mib(peak_bytes(w.meta_batch, w.resident(), device)), "times": []}
    for _ in range(0 if args.memory_only else args.repeats):
        for name, w in workloads.items():
            results[name]["times"].append(timed(w.meta_batch, device) / w.per_repeat())
    for r in results.values():
        times = r.pop("times")
        r |= {"ms": statistics.median(times) if times else None, "ms_min": min(times, default=None),
              "ms_max": max(times, default=None), "n": len(times)}
    return results


def _mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


# --- driver -------------------------------------------------------------------------------------


def run(args, save) -> dict:
    """Measure everything asked for; `save(result)` is called after every configuration."""
    import smat

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    import devices

    args.precision = devices.resolve_precision(args.precision, device)  # as train.py: fp32 on CPU
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    use_amp = device.type == "cuda" and dtype is not None

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if use_amp else nullcontext()

    variants = {"": smat}
    if args.baseline is not None:
        variants = {"base:": load_module("smat_baseline", args.baseline), "": smat}
    presets = (args.preset or ("tiny,vit_small_patch16" if device.type == "cuda" else "tiny")).split(",")
    experts = [int(m) for m in args.experts.split(",")]
    parts = args.parts.split(",")

    rows = []
    result = {"meta": environment(device, args), "rows": rows}
    for preset in presets:
        size = args.image_size or IMAGE_SIZE[preset]
        for shape in args.shapes.split(","):
            ways, shots, queries = SHAPES[shape]
            episode = Episode(ways, shots, queries, size, device)
            base = dict(preset=preset, image_size=size, shape=shape, images=ways * (shots + queries))
            common = dict(backbone=preset, image_size=size, meta_batch=args.meta_batch, precision=args.precision,
                          episodes=args.meta_batch * 200)  # a whole number of meta-batches, as Config asks
            groups = [(part, m) for part in parts for m in {"pmf": [1], "fwdbwd": [0]}.get(part, experts)]
            for part, m in groups:
                workloads = make_workloads(part, m, variants, preset, common, episode, args.meta_batch,
                                           autocast, device, args.compile)
                for name, r in measure(workloads, args, device).items():
                    rows.append(base | {"part": name, "experts": m} | r)
                    print(format_row(rows[-1]), flush=True)
                save(result)  # a run cut short still leaves what it measured
                del workloads
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return result


def make_workloads(part, m, variants, preset, common, episode, meta_batch, autocast, device, compiled=False) -> dict:
    """The workloads of one table group, measured interleaved: one per smat variant (two for predict),
    and with `compiled` a second smat/pmf step whose backbone forward devices.compile_backbone compiled."""
    if part == "fwdbwd":
        return {"fwdbwd": FwdBwdWorkload(preset, episode, meta_batch, autocast, device)}
    made = {}
    for label, mod in variants.items():
        cfg = mod.Config.pmf(**common) if part == "pmf" else mod.Config(**common, n_experts=m)
        model = build(mod, preset, cfg, device)
        if part == "predict":
            made[f"{label}predict"] = PredictWorkload(mod, model, episode, autocast, device, pretrained=False)
            made[f"{label}protonet"] = PredictWorkload(mod, model, episode, autocast, device, pretrained=True)
        else:
            made[f"{label}{part}"] = StepWorkload(mod, model, episode, autocast, device)
            if compiled and not label:  # the current smat.py only
                import devices

                twin = build(mod, preset, cfg, device)
                devices.compile_backbone(twin)
                made[f"{part}:compiled"] = StepWorkload(mod, twin, episode, autocast, device)
    return made


def environment(device: torch.device, args) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})",
        "cpu_threads": torch.get_num_threads(),
        "precision": args.precision,
        "typecheck": not (args.no_typecheck or args.compile),
        "meta_batch": args.meta_batch, "warmup": args.warmup, "repeats": args.repeats,
        "baseline": str(args.baseline) if args.baseline else None,
        "command": " ".join(sys.argv),
    }


HEADER = f"{'preset':<18} {'px':>4} {'shape':<7} {'imgs':>4} {'part':<16} {'M':>3} {'ms/ep':>9} " \
         f"{'min':>8} {'max':>8} {'peak MiB':>9} {'saved MiB':>9}"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_row(r: dict) -> str:
    return (f"{r['preset']:<18} {r['image_size']:>4} {r['shape']:<7} {r['images']:>4} {r['part']:<16} "
            f"{r['experts']:>3} {_fmt(r['ms'], '9.2f'):>9} {_fmt(r['ms_min'], '8.2f'):>8} {_fmt(r['ms_max'], '8.2f'):>8} "
            f"{_fmt(r['peak_mib'], '9.0f'):>9} {_fmt(r['saved_mib'], '9.1f'):>9}")


# The targets for ViT-S/16 at 128 px on an H100/H200 and the official implementation's anchors
# (docs/performance.md, "Targets and anchors")
TARGETS = {"smat_ms": 60.0, "peak_gib": 4.0, "experts_16_over_8": 1.15, "smat_over_pmf": 3.0,
           "predict_over_protonet": 1.3}
OFFICIAL = {("10w2s", 8): (403.0, 8.8), ("20w18s", 8): (529.0, 16.2), ("10w2s", 16): (505.0, 13.3)}  # ms, GiB


def summarize(rows: list[dict]) -> list[str]:
    """One line per (preset, shape): the ratios and figures the targets are about."""
    lines = []
    for key in dict.fromkeys((r["preset"], r["shape"]) for r in rows):
        ms = {(r["part"], r["experts"]): r["ms"] for r in rows if (r["preset"], r["shape"]) == key and r["ms"]}
        peak = {(r["part"], r["experts"]): r["peak_mib"] for r in rows if (r["preset"], r["shape"]) == key}
        parts = []
        for m in (8, 16):
            if ("smat", m) in ms:
                vits = key[0] == "vit_small_patch16"  # the targets and anchors are for ViT-S/16 at 128 px
                official = OFFICIAL.get((key[1], m)) if vits else None
                gib = peak[("smat", m)] and peak[("smat", m)] / 1024
                parts.append(f"SMAT M={m} {ms[('smat', m)]:.1f} ms" + (f" {gib:.2f} GiB" if gib else "")
                             + (f" (targets <= {TARGETS['smat_ms']:.0f} ms, <= {TARGETS['peak_gib']} GiB)" if vits else "")
                             + (f" [official {official[0]:.0f} ms {official[1]} GiB]" if official else ""))
        ratios = [("16/8 experts", ("smat", 16), ("smat", 8), TARGETS["experts_16_over_8"]),
                  ("SMAT/PMF", ("smat", 8), ("pmf", 1), TARGETS["smat_over_pmf"]),
                  ("predict/ProtoNet", ("predict", 8), ("protonet", 8), TARGETS["predict_over_protonet"])]
        for name, a, b, target in ratios:
            if a in ms and b in ms:
                ratio = ms[a] / ms[b]
                parts.append(f"{name} {ratio:.2f}x ({'meets' if ratio <= target else 'misses'} <= {target}x)")
        if ("base:smat", 8) in ms and ("smat", 8) in ms:
            parts.append(f"speed-up over base M=8 {ms[('base:smat', 8)] / ms[('smat', 8)]:.2f}x")
        lines.append(f"# {key[0]} {key[1]}: " + "; ".join(parts))
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.no_typecheck or args.compile:  # dynamo cannot trace the shape checks (as train.py --compile)
        os.environ["JAXTYPING_DISABLE"] = "1"  # before jaxtyping is imported by smat / backbone
    out = args.json or ROOT / "benchmarks" / "results" / f"bench-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    result = run(args, lambda result: out.write_text(json.dumps(result, indent=2) + "\n"))
    meta = result["meta"]
    timing = "memory only" if args.memory_only else \
        f"median of {args.repeats} meta-batches of {args.meta_batch} after {args.warmup} warm-up"
    print(f"# {meta['device']}, torch {meta['torch']}, {meta['precision']}, {meta['cpu_threads']} CPU threads, "
          f"{meta['date']}; {timing}")
    print("\n".join(summarize(result["rows"])))
    print(f"# wrote {out}")


if __name__ == "__main__":
    main()
