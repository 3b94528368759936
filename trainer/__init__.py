"""UME-MMA training: encoders, late-fusion model, configs, stages and evaluation on Ray Train."""
