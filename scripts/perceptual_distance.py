r"""How the diffusion process removes perceptual content (paper Fig. 1, Fig. B): perceptual distances between noisy
images as functions of SNR. No model is involved.

    python scripts/perceptual_distance.py --out_dir figures/perceptual_distance --num_triplets 200

For --num_triplets random pairs of different dataset images (x_0, x'_0) and each SNR of a log grid, three noisy
images x_tA, x_tB ~ q(x_t | x_0) and x'_t ~ q(x_t | x'_0), with x_t = √ᾱ x_0 + √(1-ᾱ) ε and ᾱ = SNR/(1+SNR), give
d(x_tA, x_tB) (same image, blue in the paper) and d(x_tA, x'_t) (different images, orange). Noisy images are
clamped to [-1, 1] and quantised to uint8, as they look when saved, before the network sees them.

Networks (--network; the paper used LPIPS):
  lpips       LPIPS v0.1 of the `lpips` package; its torchvision backbone weights must be in torch.hub's cache
  inception   the FID Inception pool features (clean-fid's resize), d = ‖f(a)/‖f(a)‖ - f(b)/‖f(b)‖‖₂ in [0, 2]
  auto        lpips where available, else inception
--network_path FILE uses any TorchScript network mapping [N, 3, H, W] in [-1, 1] to features, with the same d.
The outputs name the network that was used.

Writes to --out_dir:
  perceptual_distance.png    mean distances against SNR (± one standard deviation), the paper's stages shaded
  perceptual_distance.csv    per SNR: mean and standard deviation of both distances
  perceptual_distance.json   settings, the network, the image pairs, and every distance [S][K]
"""

import argparse
import os

import numpy as np

from guided_diffusion import dist_util
from guided_diffusion.analysis import AnalysisError, ImageSet, noisy_pair_distances, snr_grid
from guided_diffusion.cli import script_main
from guided_diffusion.fileio import write_csv, write_json
from guided_diffusion.perceptual import NETWORK_CHOICES, load_perceptual_network
from guided_diffusion.plotting import plot_distance_curves
from guided_diffusion.script_util import CONFIG_HELP, parse_args as parse_flags


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help=CONFIG_HELP)
    parser.add_argument("--out_dir", default="", help="folder for the figure and numbers (required)")
    parser.add_argument("--data_dir", default="", help="folder, zip or sample npz of images; '' = the bundled demo set")
    parser.add_argument("--image_size", type=int, default=0, help="centre-crop size; 0 = the first image's short side")
    parser.add_argument("--num_triplets", type=int, default=200, help="random image pairs averaged (paper: 200)")
    parser.add_argument("--snr_min", type=float, default=1e-4, help="lowest SNR of the grid")
    parser.add_argument("--snr_max", type=float, default=1e4, help="highest SNR of the grid")
    parser.add_argument("--snrs_per_decade", type=int, default=2, help="grid points per factor 10 of SNR")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair draw and of every noise")
    parser.add_argument("--network", default="auto", choices=NETWORK_CHOICES, help="perceptual network")
    parser.add_argument("--network_path", default=None, help="TorchScript feature network; replaces --network")
    parser.add_argument("--inception_path", default=None, help="clean-fid's inception-2015-12-05.pt for inception")
    parser.add_argument("--lpips_net", default="alex", help="LPIPS backbone: alex, vgg or squeeze")
    parser.add_argument("--batch_size", type=int, default=64, help="images per network batch")
    return parse_flags(parser, argv)


def draw_pairs(num_images, num_triplets, seed):
    """int64 [K, 2]: K pairs of distinct image indices, each drawn uniformly."""
    if num_images < 2:
        raise AnalysisError(f"--data_dir holds {num_images} image(s); pairs of different images need at least 2")
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(num_images, size=2, replace=False) for _ in range(num_triplets)])


def run(args):
    if not args.out_dir:
        raise AnalysisError("--out_dir is required: the folder for the figure and numbers")
    if args.num_triplets < 1 or args.batch_size < 1:
        raise AnalysisError("--num_triplets and --batch_size must be >= 1")
    snrs = snr_grid(args.snr_min, args.snr_max, args.snrs_per_decade)
    network = load_perceptual_network(args.network, args.network_path, args.inception_path, args.lpips_net,
                                      str(dist_util.dev()), args.batch_size)
    image_set = ImageSet(args.data_dir, args.image_size)
    pairs = draw_pairs(len(image_set), args.num_triplets, args.seed)
    same, different = noisy_pair_distances(image_set.load(pairs[:, 0]), image_set.load(pairs[:, 1]), snrs, network,
                                           seed=args.seed)
    os.makedirs(args.out_dir, exist_ok=True)
    curves = [("same image: d(x_tA, x_tB)", same, "tab:blue"),
              ("different images: d(x_tA, x'_t)", different, "tab:orange")]
    title = f"{args.num_triplets} triplets; {network.kind}: {network.name}"
    plot_distance_curves(snrs, curves, title, os.path.join(args.out_dir, "perceptual_distance.png"))
    rows = [[float(s), float(a.mean()), float(a.std()), float(b.mean()), float(b.std())]
            for s, a, b in zip(snrs, same, different)]
    write_csv(os.path.join(args.out_dir, "perceptual_distance.csv"),
              ["snr", "same_mean", "same_std", "different_mean", "different_std"], rows)
    write_json(os.path.join(args.out_dir, "perceptual_distance.json"), dict(
        network=network.name, network_kind=network.kind, data_dir=image_set.path, image_size=image_set.image_size,
        num_triplets=args.num_triplets, seed=args.seed, snr=snrs.tolist(), pairs=pairs.tolist(),
        same_mean=same.mean(axis=1).tolist(), different_mean=different.mean(axis=1).tolist(),
        same=same.tolist(), different=different.tolist(),
    ))
    print(f"{'SNR':>10} {'same':>8} {'different':>10}   ({network.name})")
    for snr, a, b in zip(snrs, same, different):
        print(f"{snr:10.3g} {a.mean():8.4f} {b.mean():10.4f}")
    print(f"wrote {args.out_dir}/perceptual_distance.png, .csv, .json")
    return snrs, same, different


@script_main()
def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
