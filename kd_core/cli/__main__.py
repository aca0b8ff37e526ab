"""`python -m kd_core.cli` (how the train_student stage relaunches itself under torch.distributed.run)."""

from kd_core.cli import main

main()
