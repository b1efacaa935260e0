"""The gateway: several models (local engines and upstream APIs) behind one endpoint, a response
cache in front of them, cascades that try the cheapest model first, and receipts of what each
lever saved. See docs/gateway.md."""
