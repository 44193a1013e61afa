"""Export one consolidated fp32 `model.safetensors` + `config.yaml` from a run or checkpoint.

    python launch/export.py runs/kl                                       # newest checkpoint -> runs/kl/export/
    python launch/export.py runs/kl/checkpoints/step_5000 --out kl_f8/    # also from a ZeRO-3 checkpoint
    python launch/export.py runs/kl --ema --out kl_f8_ema/                # the EMA weights
    python launch/export.py runs/kl --format diffusers --out kl_f8_diffusers/   # AutoencoderKL / VQModel folder

Works offline in one CPU process, whatever wrote the checkpoint (one process, DDP, ZeRO-1/2/3).
The exported folder loads with launch/sample.py and launch/evaluate.py, or with
`safetensors.torch.load_file` + `models.build_model(config.model)`. DeepSpeed's shards hold Python
objects besides tensors and DeepSpeed loads them with pickle: export only checkpoints you trust.

--format diffusers writes `config.json` + `diffusion_pytorch_model.safetensors`, which
`diffusers.AutoencoderKL.from_pretrained(OUT)` (kind=kl) or `VQModel.from_pretrained(OUT)` (kind=vq)
loads; a model diffusers cannot express is refused in one line (harness/diffusers_io.py). Where
diffusers is installed, the export is loaded with it and its reconstruction compared with ours.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import checkpoint as ckpt  # noqa: E402
from harness import diffusers_io  # noqa: E402
from harness.export import ExportError, save_safetensors  # noqa: E402
from harness.inference import LoadError, find_weights_dir, load_model, state_dict_of  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a run folder (its newest checkpoint) or a checkpoint folder")
    p.add_argument("--out", help="output folder (default: <run or checkpoint>/export)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights")
    p.add_argument("--format", choices=["safetensors", "diffusers"], default="safetensors",
                   help="safetensors: ours (model.safetensors + config.yaml); diffusers: config.json + "
                        "diffusion_pytorch_model.safetensors (default --out: <model>/diffusers)")
    args = p.parse_args(argv)
    if args.format == "diffusers":
        return export_diffusers(args)
    try:
        folder = find_weights_dir(args.model)
        state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state_dict_of(folder, args.ema).items()}
        out = Path(args.out) if args.out else Path(args.model) / "export"
        n = sum(v.numel() for v in state.values())
        path = save_safetensors(state, out / "model.safetensors", {"source": folder.resolve(), "parameters": n, "ema": args.ema})
        (out / ckpt.CONFIG_NAME).write_text((folder / ckpt.CONFIG_NAME).read_text())
        load_model(out)  # the export must rebuild: fail here, not in the user's hands
    except (ExportError, LoadError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({len(state)} tensors, {n / 1e6:.2f}M values) and {out / ckpt.CONFIG_NAME}")
    return 0


def export_diffusers(args) -> int:
    try:
        model, cfg, folder = load_model(args.model, ema=args.ema)
        out = Path(args.out) if args.out else Path(args.model) / "diffusers"
        size = cfg.model.resolution or cfg.data.image_size
        out, dcfg = diffusers_io.save_folder(model, cfg.model, out, sample_size=size)
        # a small image: the check is about names and layouts, not about the model's resolution
        diff = diffusers_io.check_loads(out, model, 2 ** (len(cfg.model.ch_mult) - 1) * 4)
    except (ExportError, LoadError, diffusers_io.DiffusersError) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in diffusers_io.state_to_diffusers(model.state_dict()).values())
    print(f"wrote {out / diffusers_io.WEIGHTS_NAME} ({n / 1e6:.2f}M values) and {out / diffusers_io.CONFIG_NAME} "
          f"({dcfg['_class_name']}, from {folder})")
    if diff is None:
        print("diffusers is not installed here: the export was not loaded back (pip install diffusers to check)")
    else:
        print(f"diffusers {dcfg['_class_name']}.from_pretrained loads it; largest reconstruction difference {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
