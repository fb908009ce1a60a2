"""The safety suite: shipped probe sets, rule and rubric-judge scoring, one inspect task per dimension."""
