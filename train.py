"""Train a 3D U-Net on an MSD task: `python train.py task=left_atrium precision=16`
(`lightning-seg-train` where the package is installed)."""

from lightning_seg.training import main

if __name__ == "__main__":
    main()
