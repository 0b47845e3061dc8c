"""Typed configs of every stage. Each field's ``help`` is the one-line *why* of its default; the CLI
turns these fields into typer options, so `--help` and the code never disagree.

Defaults are the paper's / official code's (see docs/ and shared reference notes); tests and the demo
override sizes and iteration counts, never semantics.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from snd.errors import SndError


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with CLI help text."""
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SynthConfig:
    """`snd data synth`: procedural rooms written in the raw ScanNet++ v2 layout."""

    out: Path = opt(Path("data/synth"), "Output root (gets data/<scene>/... and splits/ like ScanNet++ v2).")
    scenes: int = opt(4, "Number of scenes to generate.")
    frames: int = opt(30, "Frames per scene along a smooth camera trajectory.")
    height: int = opt(292, "Image height in pixels (ScanNet++ resized DSLR halved twice is ~292).")
    width: int = opt(438, "Image width in pixels.")
    objects: int = opt(6, "Objects per room (boxes, cylinders, spheres; one instance each).")
    seed: int = opt(0, "Random seed; the same seed gives byte-identical scenes.")
    fisheye: bool = opt(False, "Write the raw release's fisheye DSLR layout (resized_images/ + transforms.json, OPENCV_FISHEYE k1..k4), so readers decode and undistort every frame.")
    workers: int = opt(0, "Processes writing scenes in parallel (0 = one per CPU, at most one per scene); the bytes do not depend on it.")


@dataclass
class PrecomputeConfig:
    """`snd precompute`: stage one, scaffolds of all context pairs into Zarr shards."""

    data: Path = opt(Path("data/synth"), "Dataset root: raw ScanNet++ v2, FiT3D/SnD prepared layout, or `snd data synth` output.")
    layout: Literal["auto", "scannetpp", "prepared"] = opt("auto", "Folder layout of --data; auto detects it.")
    split: str = opt("distill", "Scene list: 'distill' = nvs_sem_train + nvs_sem_val (the paper's 280 only with ScanNet++ v1's lists; v2's are longer, detected and reported), 'train'/'val', or 'all' (every scene folder on disk).")
    scenes: Optional[int] = opt(None, "Take the first N scenes of the split (280 = the paper's training set); default all.")
    out: Path = opt(Path("cache"), "Output Zarr store (a folder).")
    source: Literal["depth", "mvsplat"] = opt("depth", "Scaffold source: dataset/mesh depth, or frozen MVSplat (needs --mvsplat-ckpt).")
    mvsplat_ckpt: Optional[Path] = opt(None, "MVSplat Lightning checkpoint (re10k.ckpt or a ScanNet++ fine-tune).")
    mvsplat_config: Literal["scannetpp", "re10k"] = opt("scannetpp", "MVSplat encoder config the checkpoint was trained with.")
    height: int = opt(576, "Scaffold height: SnD's MVSplat input is 576x880.")
    width: int = opt(880, "Scaffold width.")
    near: float = opt(1.0, "MVSplat near plane (SnD's ScanNet++ experiment: 1).")
    far: float = opt(100.0, "MVSplat far plane (SnD's ScanNet++ experiment: 100).")
    gap_min: int = opt(8, "Smallest frame gap between the two context views (SnD 'bounded' sampler).")
    gap_max: int = opt(12, "Largest frame gap between the two context views.")
    pairs_per_scene: int = opt(180, "Context pairs kept per scene (~50k pairs over 280 scenes); 0 = all.")
    targets_per_pair: int = opt(3, "Target views stored per pair (stage two draws one per step).")
    batch_pairs: int = opt(0, "Pairs per MVSplat forward; 0 = auto: 8 on CUDA (31 pairs/s on an H100, ~5% over 4), 1 on CPU (8 pairs at 576x880 need ~23 GiB).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", "Network precision: auto = bf16 on CUDA, fp32 on CPU.")
    compile: Literal["auto", "on", "graphs", "off"] = opt("auto", "torch.compile MVSplat's networks (~100 s once); graphs = compiled and replayed as CUDA graphs; auto = graphs on CUDA, off on CPU.")
    device: str = opt("auto", "'auto', 'cpu' or 'cuda[:i]'.")
    rank: int = opt(0, "This worker's index (also read from torchrun's RANK).")
    world_size: int = opt(1, "Number of workers splitting the scenes (also read from WORLD_SIZE).")
    seed: int = opt(0, "Seed of the pair sampler.")
    operator: bool = opt(True, "Also store each target's transfer operator: stage two then needs no render (fast path).")
    patch_size: int = opt(14, "Patch size of stage two's backbone (14: DINOv2, 16: DINOv3); the operators' patch grids and the stored frames' size follow it.")
    operator_img_height: Optional[int] = opt(None, "Stage two's backbone input height the operators are built for (default: --height floored to a multiple of --patch-size).")
    operator_img_width: Optional[int] = opt(None, "Stage two's backbone input width (default: --width floored to a multiple of --patch-size).")
    operator_upsample: Literal["mask", "bilinear"] = opt("mask", "Upsampling baked into the operators (stage two must use the same).")
    operator_blend: bool = opt(True, "Semantic blending baked into the operators (stage two must use the same).")
    targets_protocol: Literal["official", "snd"] = opt("official", "Target/coverage rules baked into the operators: 'official' = the official SnD code's, 'snd' = snd's earlier variant (docs/distill.md); stage two must use the same.")
    operator_row_cap: int = opt(64, "Kept context patches per target patch (dropped mass is reported; 0 at the default on procedural scenes).")
    operator_inst_cap: int = opt(128, "Kept instance labels per target view for blending.")
    operator_stream: bool = opt(True, "On CUDA, build the operators on their own stream, so the GPU runs them beside MVSplat's next batch instead of after it (the same operators; --no-operator-stream queues them behind it, as before 2026-12-05).")
    operator_thread: bool = opt(True, "Build the operators on a thread of their own, so the main thread goes on queueing MVSplat's next batches meanwhile (the same store; --no-operator-thread builds them on the main thread, as before 2026-12-06).")
    operator_priority: bool = opt(True, "Give the operators' CUDA stream a higher priority than MVSplat's, so the builder's short kernels (and the host syncs behind them) do not wait for the network's long ones; MVSplat fills the gaps (the same store).")
    operator_workers: int = opt(0, "Operator threads building successive batches at once, each on a CUDA stream of its own (with --operator-thread; the same store); 0 = auto: 2 on CUDA (+26-34 % over one on an H100 where the builder thread was the limit; docs/performance.md), 1 on CPU.")
    writer: Literal["auto", "thread", "process"] = opt("auto", "Where the shard writer runs: a thread, or a child process with a GIL of its own (zarr's chunk writes are mostly Python, which competes with the threads launching GPU work); auto = process on CUDA, thread on CPU (docs/performance.md). The same store.")
    writer_codecs: Literal["zarr", "zarrs"] = opt("zarr", "Codec pipeline the shards are encoded with: zarr (zarr-python's own) or zarrs (zarrs-python's Rust pipeline, a shard's chunks encoded outside Python: faster where the writer is the limit, but the chunks' order inside a shard file varies run to run, so stores are value- and checksum-identical, not byte-identical; docs/cache-format.md).")
    operator_chunk: int = opt(0, "Targets whose operators are built together (one batched render and one sort each); 0 = auto: 24 on CUDA (a batch of 8 pairs at once), 1 on CPU (where bigger chunks measured slower, docs/performance.md). GPU memory grows with it (a 576x880 target has ~15-40 M compositing weights); a chunk that runs out of GPU memory is retried in halves and the run goes on at the smaller size (same operators).")
    images: Literal["jpeg", "lossless", "off"] = opt("lossless", "Store every frame the pairs use, once, at stage two's input size, so `snd distill` needs no dataset: lossless (bit-identical to the dataset path, the official inputs) or jpeg (3-4x smaller, GPU-decoded, a few grey levels off; docs/cache-format.md); off = stage two reads the dataset.")
    image_quality: int = opt(95, "JPEG quality of the stored frames (95: ~0.2 MB per 574x868 frame, max pixel error 14; docs/cache-format.md).")


@dataclass
class DistillConfig:
    """`snd distill`: stage two, the SnD distillation loop over cached scaffolds."""

    shards: Path = opt(Path("cache"), "Zarr store written by `snd precompute`.")
    data: Optional[Path] = opt(None, "Read images from this dataset instead of the store's frames (needed only for stores built with --images off or by older snd; those default to the root recorded in the manifest).")
    verify_store: bool = opt(False, "Check every checksum of the store before training (`snd cache verify`; minutes per 100 GB) instead of only what training reads, when it reads it.")
    run: Path = opt(Path("runs/snd"), "Run directory (config, TensorBoard, checkpoints); an existing run resumes.")
    model: str = opt("vit_small_patch14_dinov2", "timm backbone name (vit_{small,base}_patch14[_reg4]_dinov2, vit_{small,small_plus,base,large}_patch16_dinov3[_qkvb], or a snd_test_* model; docs/backbones.md).")
    weights: Optional[Path] = opt(None, "Backbone weights: official DINOv2 .pth, timm/HF .safetensors, or an HF cache folder.")
    init: Literal["pretrained", "random"] = opt("pretrained", "'random' only for tests and the demo; SnD starts from DINOv2.")
    img_height: Optional[int] = opt(None, "Backbone input height (default: 576 floored to the backbone's patch: 574 for DINOv2's 14, as the official code; 576 for DINOv3's 16).")
    img_width: Optional[int] = opt(None, "Backbone input width (default: 880 floored to the patch: 868 for 14, 880 for 16).")
    lora_rank: int = opt(8, "LoRA rank on the student (paper: 8).")
    lora_alpha: float = opt(8.0, "LoRA alpha (official: 8).")
    lora_dropout: float = opt(0.1, "LoRA dropout (official: 0.1).")
    lora_patch_embed: bool = opt(True, "Also adapt patch_embed.proj, as the official 'proj' suffix match does.")
    head_hidden: int = opt(2048, "DINO head hidden width.")
    head_bottleneck: int = opt(256, "DINO head bottleneck.")
    head_prototypes: int = opt(65536, "DINO head prototypes (weight-normed, no bias).")
    student_temp: float = opt(1.0, "Student softmax temperature (official: 1).")
    teacher_temp: float = opt(1.0, "Teacher softmax temperature (official: 1, no centering).")
    ema_momentum: float = opt(0.999, "Teacher EMA momentum.")
    ema_every: int = opt(10, "Optimizer steps between EMA updates.")
    lr: float = opt(2e-5, "Adam peak learning rate.")
    warmup_pct: float = opt(0.01, "One-cycle cosine warm-up fraction.")
    iters: int = opt(50000, "Optimizer steps.")
    batch: int = opt(1, "Pairs per step (paper: 1).")
    grad_clip: float = opt(0.5, "Gradient-norm clip.")
    upsample: Literal["mask", "bilinear"] = opt("mask", "x-patch-size upsampling of teacher features: mask-aware (paper) or plain bilinear (ablation B).")
    blend: bool = opt(True, "Semantic blending of rendered features (off = ablation A / the correspondence variant).")
    targets_protocol: Literal["official", "snd"] = opt("official", "Rules for targets, coverage and loss: 'official' = exactly the official SnD code (corner-aligned x14 grid, zero fallback, segment means over all pixels, uncovered = no Gaussian at all, loss over all patches with both sides zeroed at uncovered ones); 'snd' = snd's earlier variant (docs/distill.md).")
    loss: Literal["dino", "cosine"] = opt("dino", "DINO-head cross-entropy (paper) or cosine on patch features (ablation C).")
    frozen_teacher: bool = opt(False, "Never update the teacher (ablation D).")
    render_to_context: bool = opt(False, "Render into the context views instead of a target between them (ablation E).")
    feature_render_loss: bool = opt(False, "Direct feature-rendering loss on a fixed teacher (ablation G).")
    renderer: Literal["auto", "gsplat", "torch"] = opt("auto", "Splatting backend: gsplat on CUDA, pure torch elsewhere.")
    targets: Literal["auto", "operator", "render"] = opt("auto", "Loss targets from the store's per-pair operators (no render) or by rendering; auto = operators when the store has ones built with this run's settings.")
    amp: Literal["auto", "bf16", "fp32"] = opt("auto", "Autocast: bf16 on CUDA, fp32 on CPU.")
    compile: Literal["auto", "on", "off"] = opt("auto", "torch.compile teacher and student (fused kernels); auto = inside the fast path on CUDA (2x there: docs/performance.md).")
    fast: Literal["auto", "on", "off"] = opt("auto", "Fast path: the whole step captured in CUDA graphs (needs the store's operators); auto = on CUDA when possible. On CPU 'on' runs the same body eagerly.")
    num_workers: str = opt("auto", "DataLoader worker processes reading shards and images; auto = from the CPU count and the step path (snd.train.data.resolve_num_workers).")
    image_decode: Literal["auto", "cpu", "device"] = opt("auto", "Where stored frames are decoded: device = on the GPU, whole batch at once (JPEG by nvjpeg, lossless v5 frames by undoing their filter; frees loader cores); auto = device on CUDA.")
    prefetch: int = opt(4, "Batches prefetched per worker.")
    log_every: int = opt(10, "Steps between logged scalars (read back without a host sync, written one window late).")
    ckpt_every: int = opt(1000, "Steps between checkpoints (and at the end).")
    ckpt_background: bool = opt(True, "Write checkpoints on a background thread while training goes on (the step loop only queues a copy of the tensors on their own device, ~350 MB of GPU memory for ViT-S; the writer thread brings it to the host; files stay atomic). Off: the step loop waits for each write (~0.6-1.9 s for a ViT-S run's 350 MB).")
    seed: int = opt(0, "Seed of init, LoRA dropout and shard shuffling.")
    device: str = opt("auto", "'auto', 'cpu' or 'cuda[:i]'.")


@dataclass
class EvalConfig:
    """`snd eval`: frozen-feature probes (depth, normals, segmentation, correspondence)."""

    model: str = opt("dinov2_vits14", "Backbone: dinov2_vits14/vitb14, a timm name (DINOv3 too: docs/backbones.md), an SnD run dir, or a checkpoint/export.")
    weights: Optional[Path] = opt(None, "Weights for --model when it is a name (official .pth or safetensors).")
    init: Literal["pretrained", "random"] = opt("pretrained", "'random' only for tests and the demo.")
    baseline: Optional[str] = opt(None, "A second backbone evaluated the same way, reported side by side with deltas.")
    baseline_weights: Optional[Path] = opt(None, "Weights for --baseline.")
    data_root: Path = opt(Path("data"), "Folder holding the datasets (nyuv2/, scannetpp/, scannet/, kitti/, ade20k/, voc/, scannet1500/, synth/).")
    datasets: list[str] = opt([], "Datasets to use, one per option: --datasets nyuv2 --datasets synth (default: every one found for the task).")
    out: Path = opt(Path("eval_out"), "Output folder: results.json, tables (markdown), figures, probe checkpoints.")
    protocol: Literal["paper", "fast"] = opt("paper", "'paper': the official probe protocols (flip-averaged depth scored at the GT's resolution, official crops, OneCycle beta1, mmseg's label rule); 'fast': one cached pass at the probe size (< 2 h per backbone; numbers differ, docs/evaluation.md).")
    feature_cache: bool = opt(True, "Cache frozen-backbone tokens on disk once (fast); --no-feature-cache runs the backbone every probe step with flip/colour augmentation (closer to the official training, slower; the official rules themselves are --protocol paper).")
    feature_cache_dir: Optional[Path] = opt(None, "Feature cache folder (default <out>/features); keyed by model weights + input size.")
    num_workers: str = opt("auto", "DataLoader worker processes in all (images, cached features, and the paper protocol's live training items, which are augmented on the CPU and shared out among the probes training live together); auto = the CPU cores less two on CUDA (at most 32), at most 2 on CPU.")
    img_height: Optional[int] = opt(None, "Probe input height, a multiple of the patch size (default: 480 floored to the backbone's patch: 476 for DINOv2's 14, 480 for DINOv3's 16).")
    img_width: Optional[int] = opt(None, "Probe input width (default: 640 floored to the patch: 630 for 14, 640 for 16).")
    iters: Optional[int] = opt(None, "Override every probe's iterations (the paper's schedules are 10^5 scale).")
    batch: Optional[int] = opt(None, "Override the probe batch size.")
    lr_scale: float = opt(1.0, "Multiply every probe's learning rate; quick runs with few --iters need more (e.g. 10).")
    max_images: Optional[int] = opt(None, "Use at most this many images per split (quick runs).")
    seed: int = opt(0, "Seed of probe init and sampling.")
    device: str = opt("auto", "'auto', 'cpu' or 'cuda[:i]'.")
    residency: Literal["auto", "device", "stream"] = opt("auto", "Probe training rows (cached tokens + targets): 'device' holds them all on the GPU (a batch is a gather), 'stream' reads them per step, 'auto' decides by size.")
    resident_gib: Optional[float] = opt(None, "Memory budget for --residency auto (default: free GPU memory less 8 GiB; 4 GiB on CPU).")
    probe_graph: Literal["auto", "on", "off"] = opt("auto", "Replay each probe step as a CUDA graph ('auto': on CUDA with cached features).")
    probes_together: int = opt(0, "Probes of one backbone trained at the same time, one CUDA stream each (0: all whose resident rows fit together; 1: one after another). Results do not depend on it.")
    extract_precision: Literal["fp32", "tf32", "bf16"] = opt("tf32", "Backbone arithmetic for the whole suite, token cache and live forwards alike: 'tf32' (default: per-token error ~3e-4, the order of the cache's own float16 rounding), 'fp32', or 'bf16' autocast (~5e-3). Part of the cache key.")


def to_jsonable(cfg: Any) -> dict:
    """A config as plain JSON types (Paths as strings)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = str(v) if isinstance(v, Path) else v
    return out


def save_config(cfg: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"type": type(cfg).__name__, "config": to_jsonable(cfg)}, indent=2))
    tmp.replace(path)


def load_config(cls: type, path: Path) -> Any:
    """Read a config written by `save_config`; unknown keys are an error, not silently dropped."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SndError(f"cannot read config {path}: {e}", path=path) from e
    values = raw.get("config", raw)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise SndError(f"unknown {cls.__name__} keys in {path}: {unknown}", path=path)
    kwargs = {}
    for k, v in values.items():
        default = names[k].default if names[k].default is not dataclasses.MISSING else None
        if v is not None and (isinstance(default, Path) or "Path" in str(names[k].type)):
            v = Path(v)
        kwargs[k] = v
    return cls(**kwargs)


@dataclass
class BenchPrecomputeConfig:
    """`snd bench precompute`: stage-one throughput and cache size on generated pairs."""

    source: Literal["depth", "mvsplat"] = opt("mvsplat", "Scaffold source to time (mvsplat uses random init unless --mvsplat-ckpt).")
    mvsplat_config: Literal["scannetpp", "re10k"] = opt("scannetpp", "MVSplat encoder config.")
    mvsplat_ckpt: Optional[Path] = opt(None, "Optional real checkpoint (speed does not depend on it).")
    height: int = opt(576, "Scaffold height (SnD's MVSplat input).")
    width: int = opt(880, "Scaffold width.")
    pairs: int = opt(64, "Timed pairs (after warm-up).")
    batch_pairs: int = opt(0, "Pairs per forward; 0 = auto (8 on CUDA, 1 on CPU), as `snd precompute`.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = opt("auto", "auto = bf16 on CUDA, fp32 on CPU.")
    compile: Literal["auto", "on", "graphs", "off"] = opt("auto", "torch.compile MVSplat (as `snd precompute`).")
    operator: bool = opt(True, "Also build the transfer operators (as `snd precompute`).")
    operator_chunk: int = opt(0, "Targets whose operators are built together (as `snd precompute --operator-chunk`; 0 = auto: 24 on CUDA, 1 on CPU).")
    operator_stream: bool = opt(True, "Build the operators on their own CUDA stream (as `snd precompute --operator-stream`).")
    operator_thread: bool = opt(True, "Build the operators on a thread of their own (as `snd precompute --operator-thread`).")
    operator_priority: bool = opt(True, "The operators' stream at a higher priority (as `snd precompute --operator-priority`).")
    operator_workers: int = opt(0, "Operator threads (as `snd precompute --operator-workers`; 0 = auto: 2 on CUDA, 1 on CPU).")
    writer: Literal["auto", "thread", "process"] = opt("auto", "Where the shard writer runs (as `snd precompute --writer`).")
    writer_codecs: Literal["zarr", "zarrs"] = opt("zarr", "Codec pipeline of the shard writes (as `snd precompute --writer-codecs`).")
    gpu_busy: bool = opt(False, "Trace the GPU's kernels (CUPTI) and report how much of the timed window it was busy, all streams and each stream (near 1: device-bound).")
    images: Literal["jpeg", "lossless", "off"] = opt("lossless", "Also store the frames (as `snd precompute --images`).")
    device: str = opt("auto", "'auto', 'cpu' or 'cuda[:i]'.")
    workdir: Optional[Path] = opt(None, "Where the scratch dataset and store go (default: a temp folder).")
    out: Optional[Path] = opt(None, "Write the JSON result here too (always printed).")


@dataclass
class BenchDistillConfig:
    """`snd bench distill`: stage-two step time per phase, it/s and peak memory."""

    models: list[str] = opt(["vit_small_patch14_dinov2", "vit_base_patch14_dinov2", "vit_small_patch16_dinov3", "vit_base_patch16_dinov3"], "Backbones to time, one per option (random init; a given size off a model's patch grid is rounded up to it: 574x868 -> 576x880 for patch 16).")
    img_height: Optional[int] = opt(None, "Backbone input height (default: as `snd distill`, 576 floored to each model's patch).")
    img_width: Optional[int] = opt(None, "Backbone input width (default: 880 floored to each model's patch).")
    scaffold_height: int = opt(576, "Scaffold (render) height.")
    scaffold_width: int = opt(880, "Scaffold (render) width.")
    head_prototypes: int = opt(65536, "DINO head prototypes.")
    iters: int = opt(50, "Timed steps (after warm-up).")
    warmup: int = opt(10, "Untimed warm-up steps.")
    renderer: Literal["auto", "gsplat", "torch"] = opt("auto", "Splatting backend.")
    targets_protocol: Literal["official", "snd"] = opt("official", "Target/coverage/loss rules timed (as `snd distill --targets-protocol`); time both to see what the official rules cost.")
    paths: list[str] = opt(["render", "operator", "fast"], "Step paths timed side by side, one per option: render / operator (eager) and fast (CUDA graphs; CPU: eager replay).")
    compile: Literal["auto", "on", "off"] = opt("auto", "torch.compile teacher and student; auto = in the fast path only (as `snd distill`).")
    data: Literal["auto", "memory", "store"] = opt("auto", "Batches from two in-memory items, or streamed from a scaffold store through the training loader (each rank its disjoint part); auto = store under torchrun or with --shards.")
    shards: Optional[Path] = opt(None, "Store to stream (default: one generated at the bench size in --workdir).")
    num_workers: str = opt("auto", "DataLoader workers per rank when streaming a store (auto: as `snd distill`).")
    device: str = opt("auto", "'auto', 'cpu' or 'cuda[:i]' (under torchrun: each rank its LOCAL_RANK's GPU).")
    workdir: Optional[Path] = opt(None, "Scratch folder for the generated store (default: temp).")
    out: Optional[Path] = opt(None, "Write the JSON result here too (always printed).")


@dataclass
class BenchEvalConfig:
    """`snd bench eval`: the time of `snd eval all` at the real datasets' sizes (measured rates, projected total)."""

    model: str = opt("dinov2_vits14", "Backbone to time (a name, run dir or export).")
    weights: Optional[Path] = opt(None, "Backbone weights (speed does not depend on them).")
    init: Literal["pretrained", "random"] = opt("random", "Random init is fine for timing.")
    img_height: Optional[int] = opt(None, "Probe input height (as `snd eval`: default 480 floored to the backbone's patch).")
    img_width: Optional[int] = opt(None, "Probe input width (as `snd eval`: default 640 floored to the patch).")
    images: int = opt(256, "Generated images pushed through extraction (and probe evaluation).")
    probe_iters: int = opt(2000, "Probe steps timed per task and residency (at the paper's batch size).")
    corr_pairs: int = opt(100, "Correspondence pairs timed.")
    workers: int = opt(4, "DataLoader workers (as `snd eval --num-workers`).")
    resident_gib: Optional[float] = opt(None, "Resident-rows budget (as `snd eval --resident-gib`).")
    extract_precision: Literal["fp32", "tf32", "bf16"] = opt("tf32", "Backbone arithmetic for extraction (as `snd eval --extract-precision`).")
    protocol: Literal["paper", "fast"] = opt("paper", "Protocol whose suite time is projected (as `snd eval --protocol`); 'paper' adds its extra passes per task.")
    device: str = opt("auto", "'auto', 'cpu' or 'cuda[:i]'.")
    workdir: Optional[Path] = opt(None, "Scratch folder for the feature cache (default: temp).")
    out: Optional[Path] = opt(None, "Write the JSON result here too (always printed).")


@dataclass
class BenchProjectConfig:
    """`snd bench project`: the paper-scale workflow's wall time per stage and disk, from measured bench JSONs."""

    bench_dir: Path = opt(Path("docs/bench"), "Folder searched for the newest bench JSON of each figure (files ending _cpu.json give sizes, never rates).")
    precompute: Optional[Path] = opt(None, "`snd bench precompute --source mvsplat` JSON with operators (default: the newest bench_precompute_mvsplat_operators*.json).")
    precompute_no_operator: Optional[Path] = opt(None, "Same without operators (default: the newest bench_precompute_mvsplat_no_operator*.json).")
    distill: Optional[Path] = opt(None, "`snd bench distill` JSON with --model's fast and render paths (default: the newest bench_distill_*.json having each).")
    eval: Optional[Path] = opt(None, "`snd bench eval` JSON (default: the newest bench_eval_*.json).")
    size: Optional[Path] = opt(None, "Store-size JSON of scripts/measure_store_size.py (default: the newest store_size_*.json).")
    model: str = opt("vit_small_patch14_dinov2", "Backbone distilled (the paper's ViT-S/14).")
    scenes: int = opt(280, "Scenes distilled on (the paper: ScanNet++ nvs_sem_train + nvs_sem_val).")
    pairs: int = opt(50_000, "Context pairs stored (~180 per scene, as `snd precompute`'s default).")
    steps: int = opt(50_000, "Distillation steps (as `snd distill`'s default).")
    frames_per_scene: int = opt(611, "DSLR frames per scene (ScanNet++: 171,089 images over those 280 scenes): sets how many pairs share a stored frame.")
    eval_protocol: Literal["paper", "fast"] = opt("paper", "Evaluation protocol projected (as `snd eval --protocol`).")
    out: Optional[Path] = opt(None, "Write the JSON result here too (always printed).")


@dataclass
class ExportConfig:
    """`snd export RUN`: the trained backbone as files plain timm loads (plus the official release layout)."""

    out: Path = opt(Path("export"), "Output folder (model.safetensors, config.json, README.md).")
    which: Literal["student", "teacher"] = opt("student", "Student (what SnD releases) or the EMA teacher.")
    format: Literal["timm", "snd-release"] = opt("timm", "'snd-release' also writes dinov2_{small,base}_snd.pth (torch.hub keys).")
    push: Optional[str] = opt(None, "Upload the folder to this Hugging Face repo (needs huggingface_hub + network).")


@dataclass
class FeaturesConfig:
    """`snd features IMAGES...`: dense features and pictures (PCA, K-means, cross-view matches)."""

    model: str = opt("dinov2_vits14", "Backbone: a name (+ --weights), a weights file, an snd run or export folder.")
    weights: Optional[Path] = opt(None, "Weights for a backbone name.")
    out: Path = opt(Path("features"), "Output folder (features.npz and PNGs).")
    img_height: Optional[int] = opt(None, "Bring every image to this height (a multiple of the patch size); default: its own size.")
    img_width: Optional[int] = opt(None, "Bring every image to this width (a multiple of the patch size).")
    resize: Literal["pad", "resize"] = opt("resize", "How images reach a multiple of the patch size: pad (black, bottom/right) or resize.")
    clusters: int = opt(6, "K-means segments.")
    seed: int = opt(0, "K-means seed.")
    device: str = opt("auto", "'auto', 'cpu' or 'cuda[:i]'.")


@dataclass
class CacheInfoConfig:
    """`snd cache info PATH`: what a scaffold store or an evaluation cache holds."""

    json: bool = opt(False, "Print JSON (for scripts) instead of tables.")


@dataclass
class CacheVerifyConfig:
    """`snd cache verify PATH`: read every chunk of a scaffold store and check every checksum."""

    jobs: int = opt(4, "Blocks (shards) read and checked at once; reads and decompression release the GIL.")
    fix: bool = opt(False, "Remove the bad scenes' groups and markers, so the same `snd precompute` redoes only those.")
    json: bool = opt(False, "Print the report as JSON.")


@dataclass
class CacheGcConfig:
    """`snd cache gc PATH`: list (and with --yes remove) leftovers no run will read."""

    yes: bool = opt(False, "Remove what is listed (default: only list it).")
    keep: list[str] = opt([], "Evaluation caches: weights whose feature caches stay (run dir, checkpoint, export, weights file, backbone name or 16-hex key); repeat the option.")
    json: bool = opt(False, "Print the report as JSON.")


@dataclass
class CacheAddOperatorsConfig:
    """`snd cache add-operators SRC --out DST`: a new store with SRC's arrays and frames and transfer operators
    built from what SRC holds (no dataset, no MVSplat). Operator options left unset take SRC's own settings."""

    out: Path = opt(..., "The new store (SRC is never modified); a rerun into the same folder skips complete scenes.")
    device: str = opt("auto", "Where the operators are built: auto (cuda when present), cuda, cpu.")
    batch_pairs: int = opt(8, "Pairs read and built together.")
    read_threads: int = opt(4, "Threads reading (and checking) the next batch's pairs while this batch's operators are built.")
    rank: int = opt(0, "This worker's index: scenes are split as `snd precompute` splits them (also read from torchrun's RANK).")
    world_size: int = opt(1, "Number of workers splitting the scenes (also read from WORLD_SIZE); each builds on its LOCAL_RANK's GPU.")
    operator_chunk: int = opt(0, "Targets built together (as `snd precompute --operator-chunk`; 0 = auto: 24 on CUDA, 1 on CPU).")
    patch_size: Optional[int] = opt(None, "Stage two's patch size (as `snd precompute --patch-size`); default SRC's.")
    operator_img_height: Optional[int] = opt(None, "Stage two's input height the operators are built for; default SRC's.")
    operator_img_width: Optional[int] = opt(None, "Stage two's input width; default SRC's.")
    operator_upsample: Optional[Literal["mask", "bilinear"]] = opt(None, "Upsampling baked in (as `snd precompute`); default SRC's.")
    operator_blend: Optional[bool] = opt(None, "Semantic blending baked in (as `snd precompute`); default SRC's.")
    targets_protocol: Optional[Literal["official", "snd"]] = opt(None, "Target/coverage rules baked in (as `snd precompute`); default SRC's.")
    operator_row_cap: Optional[int] = opt(None, "Kept context patches per target patch; default SRC's.")
    operator_inst_cap: Optional[int] = opt(None, "Kept instance labels per target view; default SRC's.")


@dataclass
class DoctorConfig:
    """`snd doctor`: what this machine has, and which weights and datasets are found where."""

    data_root: Path = opt(Path("data"), "Data root to look for the probe datasets in (as `snd eval --data-root`).")


@dataclass
class DemoConfig:
    """`snd demo`: the whole pipeline on procedural scenes with tiny random-init models, on the CPU."""

    out: Path = opt(Path("demo_out"), "Folder for the demo's data, cache, run and eval results.")
    scenes: int = opt(3, "Procedural scenes to generate.")
    iters: int = opt(40, "Distillation steps (tiny random-init ViT on CPU).")
    seed: int = opt(0, "Seed of everything.")
