"""The file service's HTTP face: uploads, downloads, spooled bodies, the Site.

``cim.files`` itself speaks no HTTP; these modules declare its endpoints on
``cim.http`` and ``cim.services.files`` runs them in the daemon.
"""
