"""Test doubles that must be installed to work (Inspect finds model providers only through
package entry points). Nothing here is used outside tests."""
