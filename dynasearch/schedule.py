"""Former home of the timestep schedules, kept for old imports: they live in `dynasearch.model.schedule`."""

from .model.schedule import SubnetSchedule, TimestepBuckets, is_schedule_doc, load_subnet_or_schedule  # noqa: F401
