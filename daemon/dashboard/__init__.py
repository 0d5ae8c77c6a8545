"""The operator dashboard (`kaizen dashboard`): see daemon.dashboard.app."""

from daemon.dashboard.app import create_dashboard_app

__all__ = ["create_dashboard_app"]
