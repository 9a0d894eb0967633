"""Publishing notification jobs to pushfan from Python (other languages: the JSON Schema
files in ``schemas/json`` and any Kafka client; see the README)."""

from producer.jobs import InvalidJob, JobProducer, build_job, job_key, validate
from producer.sync import SyncJobProducer

__all__ = ["InvalidJob", "JobProducer", "SyncJobProducer", "build_job", "job_key", "validate"]
