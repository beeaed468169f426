"""`python -m calm.train ...` (also `torchrun -m calm.train ...`): `calm train`, printing the result as JSON."""

from calm.cli import train_main

if __name__ == "__main__":
    train_main()
