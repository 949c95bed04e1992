"""Board profiles (data): one JSON file per RK3588 board, read by ``doctor`` and the planner's fit check."""
