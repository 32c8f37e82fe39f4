"""Generate stage, on Ray workers: model actors that capture hookpoint activations into Parquet shards."""
