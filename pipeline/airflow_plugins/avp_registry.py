"""The Airflow plugin of the registry: the API and pages of ``pipeline.registry_api`` mounted at ``/avp`` of
Airflow's API server (``fastapi_apps``), behind Airflow's own login (``AirflowAuth``: reading needs a
logged-in user, writing needs permission to trigger avp_daily), and a "Registry" entry in the navigation
(``external_views``) that opens the pages inside the Airflow UI.

Airflow finds it because ``scripts/airflow_env.sh`` points ``AIRFLOW__CORE__PLUGINS_FOLDER`` at this folder
(which holds nothing else: Airflow imports every file of its plugins folder). An ``airflow.plugins`` entry
point would need the package re-installed on every Airflow host; the folder follows the checkout.
"""

from airflow.plugins_manager import AirflowPlugin

from pipeline.registry_api import URL_PREFIX, airflow_app


class AvpRegistryPlugin(AirflowPlugin):
    name = "avp_registry"
    fastapi_apps = [{"app": airflow_app(), "url_prefix": URL_PREFIX, "name": "avp registry"}]
    external_views = [{"name": "Registry", "href": f"{URL_PREFIX}/", "url_route": "avp-registry",
                       "destination": "nav", "nav_top_level": True}]
