"""Running batches through a parent: calibration in memory or block by block (calibration), the block-by-block
pass that reads each weight once (passes), and the least-squares refit's passes on it (refitting,
reconstruction)."""
