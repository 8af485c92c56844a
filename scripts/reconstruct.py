r"""Stochastic reconstruction (paper Fig. 2 and Fig. C): perturb input images x_0 to x_t ~ q(x_t | x_0) at chosen SNRs
and run the learned reverse process from t back to 0.

    python scripts/reconstruct.py --model_path RUN_DIR/ema_0.9999_010000.pt --out_dir figures/reconstruct

Flags come from the defaults, then --config, else the config.yaml beside the checkpoint (its training options
ignored, as in image_sample.py), then the command line; --timestep_respacing is honoured, and each target SNR maps
to the respaced step whose SNR is nearest (in log scale); the SNR actually used is reported. Image k of the inputs
draws its noise from the generator of (--seed, k) at every SNR, so results do not depend on --batch_size.

Writes to --out_dir:
  reconstruction_grid.png     one row per input image (the first --grid_rows), one column per SNR, lowest first,
                              the input in the last column (exact pixels, 2 px black borders)
  reconstruction_figure.png   the same grid with each column's SNR written under it
  reconstructions.npz         reconstructions uint8 [S, N, H, W, 3], inputs uint8 [N, H, W, 3], snr [S] (actual),
                              target_snr [S], step [S] (respaced), timestep [S] (original)
  distances.csv, distances.json   per SNR: the mean, standard deviation and values of the perceptual distance
                              between input and reconstruction (Fig. C), and which network measured it
  distance_vs_snr.png         Fig. C: that mean distance against SNR, the paper's stages shaded
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from guided_diffusion import analysis, dist_util, perceptual  # noqa: E402
from guided_diffusion.cli import script_main  # noqa: E402
from guided_diffusion.fileio import atomic_write, write_csv, write_json  # noqa: E402
from guided_diffusion.model_loading import checkpoint_parser, load_model_and_diffusion, parse_checkpoint_args  # noqa: E402,E501
from guided_diffusion.plotting import plot_distance_curves, save_figure  # noqa: E402
from guided_diffusion.sampling import image_grid, write_png  # noqa: E402


def reconstruct_defaults():
    return dict(
        model_path="",               # checkpoint (U-Net state_dict: ema_*.pt, model*.pt)
        out_dir="",                  # folder for the figures and numbers (required)
        images="",                   # folder, zip or sample npz of inputs; "" = the bundled demo set
        num_images=8,                # the first N images are reconstructed and measured
        grid_rows=8,                 # rows of the grid (the first images); distances use all --num_images
        snrs="1e-3,1e-2,1e-1,1,10",  # target SNRs of x_t, each mapped to the nearest respaced step
        use_ddim=False,              # DDIM steps instead of ancestral ones
        ddim_eta=0.0,                # η of DDIM
        clip_denoised=True,          # clamp x̂₀ to [-1, 1] at each step
        seed=0,                      # image k uses the generator of (seed, k)
        batch_size=16,               # images per forward pass
        network="auto",              # perceptual distance: auto, lpips, inception, or none (grid only)
        network_path="",             # TorchScript network [N, 3, H, W] in [-1, 1] -> features; replaces --network
        inception_path="",           # clean-fid's inception-2015-12-05.pt, for --network inception
        lpips_net="alex",            # LPIPS backbone: alex, vgg, squeeze
    )


def parse_args(argv=None):
    return parse_checkpoint_args(checkpoint_parser(__doc__, reconstruct_defaults()), argv)


def check_args(args):
    if not args.model_path:
        raise analysis.AnalysisError("--model_path is required: the checkpoint whose reverse process reconstructs")
    if not args.out_dir:
        raise analysis.AnalysisError("--out_dir is required: the folder for the figures and numbers")
    if args.class_cond:
        raise analysis.AnalysisError("--class_cond True: reconstruct.py serves unconditional models only")
    if args.num_images < 1 or args.grid_rows < 1 or args.batch_size < 1:
        raise analysis.AnalysisError("--num_images, --grid_rows and --batch_size must be >= 1")
    choices = perceptual.NETWORK_CHOICES + ("none",)
    if args.network not in choices:
        raise analysis.AnalysisError(f"--network {args.network!r} is not one of {', '.join(choices)}")


def snr_label(snr):
    return f"{snr:.2g}"


def write_grids(inputs, sweep, rows, out_dir):
    """The exact-pixel grid and the labelled figure of the first `rows` inputs."""
    reconstructions = sweep["reconstructions"][:, :rows]
    tiles = np.concatenate([reconstructions, inputs[None, :rows]]).transpose(1, 0, 2, 3, 4)
    columns = tiles.shape[1]
    grid = image_grid(tiles.reshape(-1, *tiles.shape[2:]), columns=columns)
    write_png(os.path.join(out_dir, "reconstruction_grid.png"), grid)
    fig, ax = plt.subplots(figsize=(1.2 * columns + 1, 1.2 * len(tiles) + 0.8))
    ax.imshow(grid, interpolation="nearest")
    tile_width = (grid.shape[1] - 2) / columns
    ax.set_xticks([2 + tile_width * (c + 0.5) for c in range(columns)])
    ax.set_xticklabels([f"SNR {snr_label(s)}\nt={t}" for s, t in zip(sweep["snr"], sweep["timestep"])] + ["input"],
                       fontsize=8)
    ax.set_yticks([])
    ax.set_title("stochastic reconstruction x̂₀ from x_t (input on the right)")
    fig.tight_layout()
    save_figure(fig, os.path.join(out_dir, "reconstruction_figure.png"))
    plt.close(fig)


def write_distances(args, images_path, sweep, target_snrs, network, distances):
    records = [
        dict(target_snr=float(target), snr=snr, step=step, timestep=timestep, mean=float(values.mean()),
             std=float(values.std()), values=values.tolist())
        for target, snr, step, timestep, values in zip(
            target_snrs, sweep["snr"], sweep["step"], sweep["timestep"], distances
        )
    ]
    write_json(os.path.join(args.out_dir, "distances.json"), dict(
        network=network.name, network_kind=network.kind, model_path=os.path.abspath(args.model_path),
        images=images_path, num_images=len(distances[0]),
        timestep_respacing=args.timestep_respacing, sampler="ddim" if args.use_ddim else "ancestral",
        seed=args.seed, per_snr=records,
    ))
    header = ["target_snr", "snr", "step", "timestep", "mean_distance", "std_distance"]
    rows = [[r["target_snr"], r["snr"], r["step"], r["timestep"], r["mean"], r["std"]] for r in records]
    write_csv(os.path.join(args.out_dir, "distances.csv"), header, rows)

    label = f"mean over {distances.shape[1]} images (± std)"
    plot_distance_curves(np.array(sweep["snr"]), [(label, distances, "tab:blue")],
                         f"reconstruction distance ({network.kind}: {network.name})",
                         os.path.join(args.out_dir, "distance_vs_snr.png"), ylabel="distance(x₀, x̂₀)")


def run(args):
    check_args(args)
    target_snrs = analysis.parse_snrs(args.snrs)
    device = dist_util.dev()
    image_set = analysis.ImageSet(args.images, args.image_size)
    if len(image_set) < args.num_images:
        raise analysis.AnalysisError(
            f"--num_images {args.num_images}: {image_set.path} holds only {len(image_set)} images"
        )
    inputs = image_set.load(range(args.num_images))
    network = None
    if args.network != "none":
        network = perceptual.load_perceptual_network(args.network, args.network_path or None,
                                                   args.inception_path or None, args.lpips_net, str(device),
                                                   args.batch_size)
    model, diffusion, _ = load_model_and_diffusion(args)
    order = np.argsort(target_snrs)  # lowest SNR first, as in the paper
    sweep = analysis.reconstruction_sweep(model, diffusion, inputs, target_snrs[order], seed=args.seed,
                                          device=device, batch_size=args.batch_size, use_ddim=args.use_ddim,
                                          ddim_eta=args.ddim_eta, clip_denoised=args.clip_denoised)
    os.makedirs(args.out_dir, exist_ok=True)
    write_grids(inputs, sweep, args.grid_rows, args.out_dir)
    arrays = dict(reconstructions=sweep["reconstructions"], inputs=inputs, snr=np.array(sweep["snr"]),
                  target_snr=target_snrs[order], step=np.array(sweep["step"]), timestep=np.array(sweep["timestep"]))
    atomic_write(os.path.join(args.out_dir, "reconstructions.npz"), lambda f: np.savez(f, **arrays))
    for target, snr, step, timestep in zip(target_snrs[order], sweep["snr"], sweep["step"], sweep["timestep"]):
        print(f"target SNR {target:<8g} -> step {step:4d} (t = {timestep:4d}), SNR {snr:.4g}")
    if network is not None:
        distances = analysis.reconstruction_distances(network, inputs, sweep["reconstructions"])
        write_distances(args, image_set.path, sweep, target_snrs[order], network, distances)
        print(f"mean distance per SNR ({network.name}): " + ", ".join(f"{d:.4f}" for d in distances.mean(axis=1)))
    print(f"wrote {args.out_dir}")
    return sweep


@script_main()
def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
