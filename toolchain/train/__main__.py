"""``python -m edgesmith.toolchain.train CONFIG.toml [...]``: the same command as ``edgesmith train``,
importable by module name so ``torchrun -m`` can launch it on every rank."""

from edgesmith.toolchain.cli.train import main

if __name__ == "__main__":
    main()
