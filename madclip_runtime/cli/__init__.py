"""The console scripts' code: common CLI plumbing, madclip-infer, madclip-bench, madclip-prepare, volumes."""
