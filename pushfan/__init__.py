"""pushfan: push-notification fanout from Kafka jobs to FCM and APNs."""

__version__ = "0.1.0"
