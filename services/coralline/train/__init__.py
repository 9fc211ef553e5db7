"""Draft training: ShareGPT data, target feature dumps, CORAL head training (EAGLE loss, HASS
multi-step, CSRA), top-K distillation, and the grouped head's router stage."""
