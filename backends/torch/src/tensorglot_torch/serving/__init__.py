"""torch's part in serving: the ``torch.distributed`` transport (`transport`). The engine, the pool,
the workers and the ``tensorglot serve`` command are the spec's, `tensorglot.serving`; the plugin
registers the transport and the command (see `tensorglot_torch.plugin`)."""
