"""Webhooks for finished async jobs: `urls` (which URLs may be called), `signing` (Standard Webhooks),
`message` (the body and its id), `dispatcher` (at-least-once delivery from the state store)."""
