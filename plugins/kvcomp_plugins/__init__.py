"""kvcomp's built-in components, registered through the ``kvcomp.plugins`` entry points
exactly as a third-party distribution would register its own."""
