//! In-memory fake of the maps, for tests. Filled in by the planner work item.
