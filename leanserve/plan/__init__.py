"""leanserve plan: predict what a workload costs on each hardware and configuration, and when self-hosting beats an API."""
