"""Server plumbing shared by the three services: settings, logs, errors, start-up."""
