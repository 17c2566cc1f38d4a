//! Bundle sources: a local file, or HTTP(S) with `Range` resume, bounded retries and idle timeouts.
