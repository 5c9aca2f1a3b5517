"""From a checked experiment to what a run trains with: data, the student and its heads, teachers, caches."""
