"""What the stages hand each other on disk: activation shards (format and store) and SAE folders."""
