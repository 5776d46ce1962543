"""How early detectors warn of collapse: fit on healthy runs, score every run, and judge the
alarms by the warning protocol (`fitting`, `scoring`, `protocol`, `alarms`, `evaluate`), with
typed results (`results`) and their printing (`printing`)."""
