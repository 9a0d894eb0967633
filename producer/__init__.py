"""Publishing notification jobs to pushfan's jobs topic."""
