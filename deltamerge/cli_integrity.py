"""Commands about checksums: checksum, verify, inspect, diff."""
