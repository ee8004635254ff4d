"""What a probe is asked: the device and its limit, the step, the search, the strategy; and the
progress it reports as it goes. Checked when made, so a script's options get the CLI's sentences."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from bsplan.planning import checks
from bsplan.planning.choices import Mode, ProbeStrategy, RunPrecision, Search, Strategy
from bsplan.planning.errors import BadInput
from bsplan.planning.results import DEFAULT_MAX_BATCH, Trial
from bsplan.planning.units import parse_size


class Progress(Protocol):
    """What a probe or an estimate reports while it runs (the CLI prints it on stderr)."""

    def started(self, batch: int) -> None: ...
    def finished(self, trial: Trial) -> None: ...
    def note(self, text: str) -> None: ...


@dataclass(frozen=True)
class ProbeOptions:
    device: str | None = None
    memory_limit: int | None = None
    precision: RunPrecision = RunPrecision.fp32  # type: ignore[valid-type, attr-defined]
    mode: Mode = Mode.train
    steps: int = 3
    min_batch: int = 1
    max_batch: int = DEFAULT_MAX_BATCH
    multiple_of: int = 1
    headroom: float = 0.1
    search: Search = Search.predict  # predict: aim at the boundary from the trials' peaks; bisect: double, then bisect
    nproc: int = 1  # local processes, one per device (measure/world.py)
    strategy: Strategy = Strategy.none  # none (one plain process), or a ProbeStrategy
    bucket_view: bool = False  # DDP's gradient_as_bucket_view
    timeout: float = 300.0  # seconds a rank may take for one trial (or to start) before the probe stops

    def __post_init__(self) -> None:
        """Each choice made a member and each bad value refused with one sentence."""
        for name, kind, option in (("precision", RunPrecision, "--precision"), ("mode", Mode, "--mode"),
                                   ("search", Search, "--search"), ("strategy", Strategy, "--strategy")):
            object.__setattr__(self, name, kind.parse(getattr(self, name), option))
        if self.strategy not in (Strategy.none, *ProbeStrategy):
            raise BadInput(f"a probe runs --strategy {' or '.join(ProbeStrategy.values())}, not {self.strategy}: "
                           "`bsplan estimate` and `bsplan plan` model the others")
        if self.steps < 2:
            raise BadInput("--steps must be at least 2: the first step allocates the optimizer state and warms up")
        for option, value in (("--min-batch", self.min_batch), ("--multiple-of", self.multiple_of), ("--nproc", self.nproc)):
            checks.at_least(option, value)
        if self.max_batch < self.min_batch:
            raise BadInput(f"--max-batch {self.max_batch} is below --min-batch {self.min_batch}")
        if -(-self.min_batch // self.multiple_of) * self.multiple_of > self.max_batch:
            raise BadInput(f"no multiple of {self.multiple_of} lies between --min-batch and --max-batch")
        checks.headroom(self.headroom)
        if self.nproc > 1 and self.strategy == "none":
            raise BadInput("--nproc above 1 needs a --strategy (ddp or fsdp): processes without one share nothing")
        if self.mode == "infer" and self.strategy != "none":
            raise BadInput("--strategy and --nproc probe training (gradients, optimizer state, their sync): "
                           "with --mode infer probe one process")
        checks.bucket_view(self.bucket_view, self.strategy)
        if not 0 < self.timeout < math.inf:
            raise BadInput("--timeout must be more than 0 seconds")

    @classmethod
    def from_cli(cls, *, memory_limit: str | None, max_batch: int | None, **values: object) -> ProbeOptions:
        """Options as the command line gives them: sizes as text, no --max-batch for the default."""
        return cls(
            memory_limit=None if memory_limit is None else parse_size(memory_limit),
            max_batch=DEFAULT_MAX_BATCH if max_batch is None else max_batch,
            **values,  # type: ignore[arg-type]
        )
