"""The mixed-precision study, on top of the template: the step benchmark (`bench`), the memory planner
(`memory`), what a run measures (`callbacks`, composed by the `measure` config group), the
time-to-accuracy report and the dashboard. It imports the core; the core never imports it."""
