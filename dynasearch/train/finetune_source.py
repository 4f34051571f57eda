"""What `dynasearch finetune` trains and with what: the exported subnet (on a resume, the run's own model), its
timestep schedule, the data its supernet was trained on and the teacher (the supernet's full model), each checked
before anything is written, and the sections of the input's config.json the output carries over."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint.native import CONFIG_NAME, load_checkpoint, read_config, read_schedule
from ..checkpoint.pretrained import load_pretrained
from ..data import DataRecord, DatasetSplit, DataSpec
from ..diffusion.factory import diffusion_for
from ..errors import CheckpointError, ConfigError, DataError, TrainingError
from ..model.config import DiTConfig
from ..model.dit import DiT
from ..model.schedule import SubnetSchedule
from .finetune_config import DEFAULT_DISTILL_WEIGHT, FINETUNE_RUN, FinetuneConfig

__all__ = ["RUN_SECTIONS", "FinetuneSource", "load_source", "load_teacher", "stored_arguments"]

RUN_SECTIONS = frozenset(
    {"format", "format_version", "model", "subnet", "step", "train", "finetune", "init", "seeds", "distributed",
     "device", "versions", "total_steps"}
)
"""config.json sections a run writes itself (the others -- kind, schedule, search, data -- carry over)."""


@dataclass
class FinetuneSource:
    """The model to fine-tune and everything decided about it before the first step."""

    model: DiT  # on the CPU: the export's weights (a resumed run's checkpoint restores its own)
    schedule: SubnetSchedule | None  # a timestep-dynamic checkpoint's (None: static)
    split: DatasetSplit
    data_from: str  # whose config.json recorded the data ("from checkpoint 'X'", ...)
    teacher: DiT | None  # the supernet, full width, frozen (None: no distillation)
    teacher_path: str | None
    distill_weight: float
    record: dict[str, Any]  # the sections the output's config.json carries over (data included)

    def resolved(self, cfg: FinetuneConfig) -> dict[str, Any]:
        """The run's arguments as config.json records them: with the teacher and weight decided, the data's origin."""
        return {**cfg.to_dict(), "teacher": self.teacher_path, "distill_weight": self.distill_weight,
                "data_from": self.data_from}


def stored_arguments(cfg: FinetuneConfig, doc: dict[str, Any]) -> FinetuneConfig:
    """`cfg` with the arguments it leaves as None (checkpoint, teacher, weight) taken from the resumed run."""
    stored = doc[FINETUNE_RUN.section]
    return cfg.replace(**{k: stored.get(k) for k in FINETUNE_RUN.as_stored if getattr(cfg, k) is None})


def load_source(cfg: FinetuneConfig, resumed: dict[str, Any] | None) -> FinetuneSource:
    """The exported subnet of ``--checkpoint`` (or, `resumed`, the run's own model), its data and teacher."""
    if resumed is None:
        if cfg.checkpoint is None:
            raise TrainingError(f"--resume: '{cfg.out}' holds no checkpoint to resume; pass --checkpoint to start")
        where, doc = cfg.checkpoint, read_config(cfg.checkpoint)
    else:
        where, doc = cfg.out, resumed
    config = _model_config(doc, where)
    if not config.is_sliced:
        raise CheckpointError(
            f"--checkpoint '{where}' is a supernet, not an exported subnet: fine-tune a sliced checkpoint (a "
            "search's subnets/NAME or schedules/NAME); supernets are trained with train-supernet"
        )
    model = load_checkpoint(where) if resumed is None else DiT(config)
    schedule = read_schedule(doc, config, where)
    if schedule is not None and schedule.buckets.num_timesteps != diffusion_for(config).num_timesteps:
        raise CheckpointError(f"checkpoint config '{Path(where) / CONFIG_NAME}': its schedule covers "
                              f"{schedule.buckets.num_timesteps} timesteps, the diffusion has "
                              f"{diffusion_for(config).num_timesteps}")
    recorded = (doc.get("search") or {}).get("source_supernet") if resumed is None else None
    if resumed is None:
        teacher_path, weight = _choose_teacher(cfg, recorded)
    else:
        teacher_path, weight = cfg.teacher, float(cfg.distill_weight or 0.0)
    teacher = load_teacher(teacher_path, config) if teacher_path is not None and weight > 0 else None
    candidates = [(f"from checkpoint '{where}'", doc)]
    candidates += [(f"from supernet '{p}'", read_config(p)) for p in (cfg.teacher, recorded)
                   if resumed is None and p is not None and (Path(p) / CONFIG_NAME).is_file()]
    split, data_from, data = _choose_data(candidates)
    _check_fits(split, config, data_from)
    record = {k: v for k, v in doc.items() if k not in RUN_SECTIONS}
    record["data"] = data
    if teacher is None:
        teacher_path, weight = None, 0.0
    return FinetuneSource(model, schedule, split, data_from, teacher, teacher_path, weight, record)


def _model_config(doc: dict[str, Any], where: str) -> DiTConfig:
    """The model section of a checkpoint's config.json, with a CheckpointError naming the file."""
    try:
        return DiTConfig.from_dict(doc["model"])
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint config '{Path(where) / CONFIG_NAME}': {exc}") from None


def _choose_teacher(cfg: FinetuneConfig, recorded: str | None) -> tuple[str | None, float]:
    """The teacher and distillation weight of a fresh run. Distillation is on when asked for: --teacher (weight
    DEFAULT_DISTILL_WEIGHT unless given) or --distill-weight > 0 (teacher: --teacher, else the supernet the export
    names); it is off otherwise, and with --distill-weight 0."""
    given = cfg.distill_weight
    if given == 0 or (given is None and cfg.teacher is None):
        return None, 0.0
    weight = DEFAULT_DISTILL_WEIGHT if given is None else float(given)
    if cfg.teacher is not None:
        if not Path(cfg.teacher).exists():
            raise CheckpointError(f"--teacher '{cfg.teacher}' does not exist")
        return cfg.teacher, weight
    if recorded and Path(recorded).exists():
        return recorded, weight
    why = (f"the supernet '{recorded}' it was cut from does not exist" if recorded
           else "its config.json names no supernet")
    raise TrainingError(f"--distill-weight {given} needs a teacher, and '{cfg.checkpoint}' has none ({why}); "
                        "pass --teacher (the supernet's run directory)")


def load_teacher(path: str, config: DiTConfig) -> DiT:
    """The supernet at `path` (a run or checkpoint directory, or an original DiT .pt), frozen, in eval mode; it
    must be the full model `config`'s subnet was cut from."""
    if Path(path).is_dir() and _model_config(read_config(path), path).is_sliced:
        raise CheckpointError(f"--teacher '{path}' is a sliced model; the teacher is the supernet's full model "
                              "(its run directory)")
    teacher = load_pretrained(path)
    want, got = config.supernet(), teacher.config.supernet()
    differ = [f.name for f in dataclasses.fields(DiTConfig)
              if f.name != "name" and getattr(got, f.name) != getattr(want, f.name)]
    diffs = [f"{k} {getattr(got, k)!r} (the subnet's supernet has {getattr(want, k)!r})" for k in differ]
    if diffs:
        raise CheckpointError(f"--teacher '{path}' ({got.name}) is not the supernet this subnet of {want.name} was "
                              f"cut from: {'; '.join(diffs[:3])}")
    teacher.requires_grad_(False)
    return teacher.eval()


def _choose_data(candidates: list[tuple[str, dict[str, Any]]]) -> tuple[DatasetSplit, str, dict[str, Any]]:
    """The split the first candidate config.json records (:meth:`DataRecord.from_config`; the digits when none
    does), where it came from, and the data section to record: that config's own (a run's is spelled out)."""
    for where, doc in candidates:
        record = DataRecord.from_config(doc)
        if record is not None:
            return record.load(), where, dict(doc["data"]) if isinstance(doc.get("data"), dict) else _section(record)
    record = DataRecord(DataSpec("digits"))
    return record.load(), "default: no config.json records it", _section(record)


def _section(record: DataRecord) -> dict[str, Any]:
    """A config.json data section that :meth:`DataRecord.from_config` reads back as `record`."""
    return {"spec": record.name, "image_size": record.image_size, "val_fraction": record.val_fraction,
            "seed": record.seed}


def _check_fits(split: DatasetSplit, config: DiTConfig, data_from: str) -> None:
    """Raise DataError unless the data has the subnet's input size, channels and classes."""
    got = (split.image_size, split.in_channels, split.num_classes)
    want = (config.input_size, config.in_channels, config.num_classes)
    if got != want:
        hint = "" if not data_from.startswith("default") else (
            "; the checkpoint records no data: pass --teacher (the supernet's run directory, which records it)")
        raise DataError(
            f"the data '{split.name}' ({data_from}: {got[0]}x{got[0]}x{got[1]}, {got[2]} classes) does not fit "
            f"the subnet ({want[0]}x{want[0]}x{want[1]}, {want[2]} classes){hint}"
        )
