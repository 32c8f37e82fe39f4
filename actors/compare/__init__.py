"""Compare stage, in Ray tasks: exact cross-seed matching of SAE latents and N-way statistics."""
