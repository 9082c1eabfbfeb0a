"""receiver: webhook receiver and asset archiver for AI media generation APIs."""
