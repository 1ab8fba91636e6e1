"""MongoDB export service: filtered collection slices to CSV, JSON, NDJSON and XLSX files."""
