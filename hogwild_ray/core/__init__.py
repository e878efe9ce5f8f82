"""The pure logic: cache layout, protocol, sampling parameters, detokenization, events and
results. Nothing here imports torch, Ray or Triton, does I/O, or knows a device."""
